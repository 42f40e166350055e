package org.nimaedge.demo

import android.os.Bundle
import android.os.SystemClock
import android.widget.Button
import android.widget.EditText
import android.widget.TextView
import androidx.appcompat.app.AppCompatActivity
import java.io.File
import java.util.concurrent.ExecutorService
import java.util.concurrent.Executors
import org.pytorch.executorch.extension.llm.LlmCallback
import org.pytorch.executorch.extension.llm.LlmModule

/**
 * One activity: load a nima model exported with `nima-edge export CKPT --target executorch --out DIR`
 * (pushed with adb to MODEL_DIR), generate 50 greedy tokens with ExecuTorch's LlmModule and show the
 * time against the latency budget (50 tokens in under 100 ms).
 */
class MainActivity : AppCompatActivity() {

    companion object {
        const val MODEL_DIR = "/data/local/tmp/nima"
        const val NEW_TOKENS = 50
        const val BUDGET_MS = 100.0
        // nima tokenizers map this text to BOS (id 0); every training window starts with it.
        // LlmModule.generate() asks its runner for no BOS, so the prompt carries it.
        const val BOS = "<|bos|>"
    }

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
                "DIR/tokenizer_config.json $MODEL_DIR/")
            return
        }
        show(status, "Loading ${pte.path} (${pte.length() / 1024} KiB)…")
        val start = SystemClock.elapsedRealtime()
        try {
            // temperature 0: greedy, like the desktop verify/bench runs
            val m = LlmModule(pte.path, tokenizer.path, 0.0f)
            val rc = m.load()
            if (rc != 0) {
                show(status, "Loading failed (ExecuTorch error $rc). Re-export the model with this app's " +
                    "ExecuTorch version (see README).")
                return
            }
            module = m
        } catch (e: RuntimeException) {
            show(status, "Cannot load the model: ${e.message}")
            return
        }
        show(status, "Loaded ${pte.name} in ${SystemClock.elapsedRealtime() - start} ms")
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
            val seqLen = (BOS.length + text.toByteArray().size + NEW_TOKENS + 1)
            m.resetContext()
            val rc = m.generate(BOS + text, seqLen, callback, false)
            val ms = (end - start) / 1e6
            val perBudget = if (count > 0) ms * NEW_TOKENS / count else Double.NaN
            val verdict = if (perBudget < BUDGET_MS) "MET" else "MISSED"
            val report = if (rc != 0) "generate failed (ExecuTorch error $rc)" else
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
