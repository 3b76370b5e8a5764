package app.unsee.sample

import android.content.Context
import android.graphics.Bitmap
import android.os.Bundle
import androidx.activity.ComponentActivity
import androidx.activity.compose.setContent
import androidx.compose.foundation.Image
import androidx.compose.foundation.layout.Arrangement
import androidx.compose.foundation.layout.Column
import androidx.compose.foundation.layout.Row
import androidx.compose.foundation.layout.fillMaxWidth
import androidx.compose.foundation.layout.padding
import androidx.compose.foundation.layout.size
import androidx.compose.material3.AssistChip
import androidx.compose.material3.Button
import androidx.compose.material3.LinearProgressIndicator
import androidx.compose.material3.MaterialTheme
import androidx.compose.material3.OutlinedTextField
import androidx.compose.material3.Text
import androidx.compose.runtime.Composable
import androidx.compose.runtime.LaunchedEffect
import androidx.compose.runtime.getValue
import androidx.compose.runtime.mutableStateOf
import androidx.compose.runtime.remember
import androidx.compose.runtime.rememberCoroutineScope
import androidx.compose.runtime.setValue
import androidx.compose.ui.Modifier
import androidx.compose.ui.graphics.asImageBitmap
import androidx.compose.ui.unit.dp
import app.unsee.GenerationEvent
import app.unsee.Unsee
import app.unsee.ffi.DeviceKind
import app.unsee.ffi.EngineConfig
import app.unsee.ffi.GenerateRequest
import app.unsee.ffi.Precision
import app.unsee.ffi.Scheduler
import app.unsee.ffi.UnseeException
import app.unsee.toBitmap
import java.io.File
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.Job
import kotlinx.coroutines.launch
import kotlinx.coroutines.withContext

class MainActivity : ComponentActivity() {
    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        setContent { MaterialTheme { UnseeScreen(applicationContext) } }
    }
}

/** Copies assets/<dir> to files/<dir> once (the runtime reads models from the file system). */
private fun unpack(context: Context, dir: String): File {
    val out = File(context.filesDir, dir)
    fun copy(path: String, to: File) {
        val children = context.assets.list(path).orEmpty()
        if (children.isEmpty()) {
            to.parentFile?.mkdirs()
            context.assets.open(path).use { input -> to.outputStream().use { input.copyTo(it) } }
        } else {
            children.forEach { copy("$path/$it", File(to, it)) }
        }
    }
    if (!out.exists()) copy(dir, out)
    return out
}

@Composable
fun UnseeScreen(context: Context) {
    var unsee by remember { mutableStateOf<Unsee?>(null) }
    var status by remember { mutableStateOf("loading the model…") }
    var prompt by remember { mutableStateOf("a red circle") }
    var progress by remember { mutableStateOf(0f) }
    var image by remember { mutableStateOf<Bitmap?>(null) }
    var job by remember { mutableStateOf<Job?>(null) }
    val scope = rememberCoroutineScope()

    LaunchedEffect(Unit) {
        unsee = withContext(Dispatchers.IO) {
            try {
                // Guarded: only a bundle signed by the key the app ships with loads, every file is checked against
                // its manifest as it is read, and the bundle must erase "red circle".
                val bundle = unpack(context, "bundle")
                val trusted = context.assets.open("trusted.pub").bufferedReader().use { it.readText() }
                Unsee(EngineConfig(modelPath = bundle.path, device = DeviceKind.AUTO, precision = Precision.F32,
                                   trustedKeys = listOf(trusted), requiredConcepts = listOf("red circle")))
            } catch (e: UnseeException) {
                status = "could not load: ${e.message}"
                null
            }
        }
        unsee?.let { status = "ready on ${it.info().device}" }
    }

    Column(Modifier.padding(16.dp), verticalArrangement = Arrangement.spacedBy(12.dp)) {
        OutlinedTextField(value = prompt, onValueChange = { prompt = it }, label = { Text("Prompt") },
                          modifier = Modifier.fillMaxWidth())
        // The concept filter of the loaded bundle: what this model has forgotten.
        val erased = unsee?.info()?.erasures.orEmpty().flatMap { e -> e.concepts.zip(e.replacements) }
        Text(if (erased.isEmpty()) "No concepts erased" else "Erased concepts", style = MaterialTheme.typography.titleSmall)
        Row(horizontalArrangement = Arrangement.spacedBy(8.dp)) {
            erased.forEach { (concept, replacement) ->
                AssistChip(onClick = {}, label = { Text(if (replacement.isEmpty()) concept else "$concept → $replacement") })
            }
        }
        Row(horizontalArrangement = Arrangement.spacedBy(8.dp)) {
            Button(enabled = unsee != null && job == null, onClick = {
                val engine = unsee ?: return@Button
                job = scope.launch {
                    try {
                        val request = GenerateRequest(prompt = prompt, steps = 20, seed = 7, scheduler = Scheduler.DDIM)
                        engine.generateWithProgress(request).collect { event ->
                            when (event) {
                                is GenerationEvent.Progress -> progress = event.step.toFloat() / event.total
                                is GenerationEvent.Done -> image = event.image.toBitmap()
                            }
                        }
                        status = "done"
                    } catch (e: UnseeException) {
                        status = "error: ${e.message}"
                    } finally {
                        job = null
                    }
                }
            }) { Text("Generate") }
            Button(enabled = job != null, onClick = { job?.cancel(); status = "cancelled" }) { Text("Cancel") }
        }
        LinearProgressIndicator(progress = { progress }, modifier = Modifier.fillMaxWidth())
        Text(status)
        image?.let { Image(it.asImageBitmap(), contentDescription = prompt, modifier = Modifier.size(320.dp)) }
    }
}
