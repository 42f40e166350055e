package org.nimaedge.demo

import java.io.File
import org.json.JSONObject
import org.pytorch.executorch.EValue
import org.pytorch.executorch.Module
import org.pytorch.executorch.Tensor

/**
 * The device-side self-check, the same as android_demo/pi_demo.py's: `nima-edge verify` records the
 * artifact's first greedy token ids for a fixed prompt in manifest.json ("verify" -> "self_check"). The
 * phone feeds the program those ids (teacher-forced, as verify counts greedy agreement) and counts the
 * steps where its own greedy pick is the recorded token; the check passes when that share reaches the
 * recorded minimum (every token for float models, verify's tolerance for quantized ones).
 *
 * It drives the .pte's forward(tokens[1, T], input_pos[1]) -> logits[1, vocab] directly through
 * [Module]: LlmModule streams text, not logits, so it cannot say which id it would have picked.
 */
class SelfCheck(private val pte: File, private val manifest: File) {

    data class Result(val passed: Boolean, val summary: String)

    fun run(): Result {
        if (!manifest.canRead()) {
            return Result(false, "Self-check skipped: no ${manifest.name} in ${manifest.parent} (push it with the model)")
        }
        val record = try {
            JSONObject(manifest.readText()).getJSONObject("verify").getJSONObject("self_check")
        } catch (e: org.json.JSONException) {
            return Result(false, "Self-check skipped: ${manifest.name} has no verify.self_check (run nima-edge verify)")
        }
        val promptIds = record.getJSONArray("prompt_ids").let { a -> LongArray(a.length()) { a.getLong(it) } }
        val expected = record.getJSONArray("tokens").let { a -> LongArray(a.length()) { a.getLong(it) } }
        val minAgreement = record.getDouble("min_agreement")
        val quant = record.optString("quant", "?")

        val module = Module.load(pte.path)
        try {
            val maxSeqLen = module.execute("get_max_seq_len")[0].toInt()
            var logits = forward(module, promptIds, 0L, maxSeqLen)
            var hits = 0
            for (i in expected.indices) {
                if (argmax(logits).toLong() == expected[i]) hits += 1
                if (i + 1 < expected.size) {
                    logits = forward(module, longArrayOf(expected[i]), (promptIds.size + i).toLong(), maxSeqLen)
                }
            }
            val agreement = hits.toDouble() / expected.size
            val passed = agreement >= minAgreement
            val verdict = if (passed) "PASS" else "FAIL"
            return Result(passed, "Self-check $verdict: $hits/${expected.size} of the verified greedy tokens " +
                "(needs ${"%.0f".format(minAgreement * 100)}%, $quant)")
        } finally {
            module.destroy()
        }
    }

    /** Append `ids` at `start` of the program's KV cache; the last position's logits. */
    private fun forward(module: Module, ids: LongArray, start: Long, maxSeqLen: Long): FloatArray {
        var logits = FloatArray(0)
        var i = 0
        while (i < ids.size) {  // the program's largest single call is maxSeqLen tokens
            val chunk = ids.copyOfRange(i, minOf(ids.size, i + maxSeqLen.toInt()))
            val tokens = Tensor.fromBlob(chunk, longArrayOf(1, chunk.size.toLong()))
            val pos = Tensor.fromBlob(longArrayOf(start + i), longArrayOf(1))
            logits = module.forward(EValue.from(tokens), EValue.from(pos))[0].toTensor().dataAsFloatArray
            i += chunk.size
        }
        return logits
    }

    /** Index of the first largest value (numpy's tie rule, as verify and pi_demo.py use). */
    private fun argmax(values: FloatArray): Int {
        var best = 0
        for (j in values.indices) if (values[j] > values[best]) best = j
        return best
    }
}
