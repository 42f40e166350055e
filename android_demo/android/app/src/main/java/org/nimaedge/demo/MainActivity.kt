package org.nimaedge.demo

import android.os.Bundle
import android.os.SystemClock
import android.widget.Button
import android.widget.EditText
import android.widget.TextView
import androidx.appcompat.app.AppCompatActivity
import java.io.File
import org.json.JSONObject
import java.util.concurrent.ExecutorService
import java.util.concurrent.Executors
import org.pytorch.executorch.extension.llm.LlmCallback
import org.pytorch.executorch.extension.llm.LlmModule

/**
 * One activity: load a nima model exported with `nima-edge export CKPT --target executorch --out DIR`
 * (pushed with adb to MODEL_DIR), check it is the verified model (SelfCheck: the first greedy tokens
 * recorded in its manifest.json), generate 50 greedy tokens with ExecuTorch's LlmModule and show the
 * time against the latency budget (50 tokens in under 100 ms).
 *
 * Written against the Kotlin API of the executorch-android AAR (1.4 and later: load() and generate()
 * throw on failure); the AAR must be the release that exported the .pte (gradle.properties, README).
 */
class MainActivity : AppCompatActivity() {

    companion object {
        const val MODEL_DIR = "/data/local/tmp/nima"
        const val NEW_TOKENS = 50
        const val BUDGET_MS = 100.0
    }

    // Whether the model expects BOS in front of the prompt: tokenizer_config.json's add_bos_token, which
    // the exporter writes from the checkpoint's tokenizer (nima models: yes; many imported ones, e.g.
    // SmolLM2: no). The runner's tokenizer adds none by itself, so it is asked for numBos of them, as
    // pi_demo.py does. Without the file (an older export): 1, what nima models need.
    private var numBos = 1

    private val worker: ExecutorService = Executors.newSingleThreadExecutor()
    private var module: LlmModule? = null

    private lateinit var status: TextView
    private lateinit var prompt: EditText
    private lateinit var generate: Button
    private lateinit var stop: Button
    private lateinit var timing: TextView
    private lateinit var output: TextView

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        setContentView(R.layout.activity_main)
        status = findViewById(R.id.status)
        prompt = findViewById(R.id.prompt)
        generate = findViewById(R.id.generate)
        stop = findViewById(R.id.stop)
        timing = findViewById(R.id.timing)
        output = findViewById(R.id.output)

        generate.setOnClickListener { runGeneration(prompt.text.toString()) }
        stop.setOnClickListener { module?.stop() }
        worker.execute { loadModel() }
    }

    override fun onDestroy() {
        module?.stop()
        worker.shutdown()
        module?.resetNative()
        super.onDestroy()
    }

    private fun loadModel() {
        val pte = File(MODEL_DIR, "model.pte")
        val tokenizer = File(MODEL_DIR, "tokenizer.json")
        if (!pte.canRead() || !tokenizer.canRead()) {
            show(status, "No model in $MODEL_DIR.\nPush one: adb push DIR/model.pte DIR/tokenizer.json " +
                "DIR/tokenizer_config.json DIR/manifest.json $MODEL_DIR/")
            return
        }
        show(status, "Loading ${pte.path} (${pte.length() / 1024} KiB)…")
        val start = SystemClock.elapsedRealtime()
        try {
            // temperature 0: greedy, like the desktop verify/bench runs
            val m = LlmModule(pte.path, tokenizer.path, 0.0f)
            m.load()
            module = m
        } catch (e: RuntimeException) {  // ExecutorchRuntimeException carries the ExecuTorch error code
            show(status, "Loading failed: ${e.message}\nExport the model with the executorch release of " +
                "this app's AAR (see README).")
            return
        }
        numBos = try {
            if (JSONObject(File(MODEL_DIR, "tokenizer_config.json").readText()).optBoolean("add_bos_token", true)) 1 else 0
        } catch (e: java.io.IOException) {
            1
        } catch (e: org.json.JSONException) {
            1
        }
        val loaded = "Loaded ${pte.name} in ${SystemClock.elapsedRealtime() - start} ms"
        show(status, "$loaded\nSelf-check…")
        val check = try {
            SelfCheck(pte, File(MODEL_DIR, "manifest.json")).run().summary
        } catch (e: RuntimeException) {
            "Self-check FAIL: ${e.message}"
        }
        show(status, "$loaded\n$check")
        runOnUiThread { generate.isEnabled = true }
    }

    private fun runGeneration(text: String) {
        val m = module ?: return
        generate.isEnabled = false
        stop.isEnabled = true
        output.text = text
        timing.text = ""
        worker.execute {
            val pieces = StringBuilder()
            var count = 0
            var stats = ""
            val start = SystemClock.elapsedRealtimeNanos()
            var end = start
            val callback = object : LlmCallback {
                override fun onResult(result: String) {
                    count += 1
                    pieces.append(result)
                    end = SystemClock.elapsedRealtimeNanos()
                    val shown = text + pieces
                    runOnUiThread { output.text = shown }
                    if (count >= NEW_TOKENS) m.stop()
                }

                override fun onStats(json: String) {
                    stats = json
                }
            }
            // seqLen bounds prompt + new tokens; byte-level tokenizers use at most one token per byte,
            // so this always leaves room for NEW_TOKENS (the callback stops at exactly NEW_TOKENS).
            val seqLen = (numBos + text.toByteArray().size + NEW_TOKENS + 1)
            m.resetContext()
            val error = try {
                // temperature 0 (greedy), no echo of the prompt, the model's BOS, no EOS appended
                m.generate(text, seqLen, callback, false, 0.0f, numBos, 0)
                null
            } catch (e: RuntimeException) {
                e.message
            }
            val ms = (end - start) / 1e6
            val perBudget = if (count > 0) ms * NEW_TOKENS / count else Double.NaN
            val verdict = if (perBudget < BUDGET_MS) "MET" else "MISSED"
            val report = if (error != null) "generate failed: $error" else
                "%d tokens in %.1f ms (%.0f tokens/s, prefill included)\nbudget %d tokens < %.0f ms: %s\n%s"
                    .format(count, ms, 1000.0 * count / ms, NEW_TOKENS, BUDGET_MS, verdict, stats)
            runOnUiThread {
                timing.text = report
                generate.isEnabled = true
                stop.isEnabled = false
            }
        }
    }

    private fun show(view: TextView, text: String) = runOnUiThread { view.text = text }
}
