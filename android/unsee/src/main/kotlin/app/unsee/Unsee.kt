package app.unsee

import app.unsee.ffi.AuditReport
import app.unsee.ffi.CancelToken
import app.unsee.ffi.Engine
import app.unsee.ffi.EngineConfig
import app.unsee.ffi.EngineInfo
import app.unsee.ffi.ErasureSummary
import app.unsee.ffi.GenerateRequest
import app.unsee.ffi.GeneratedImage
import app.unsee.ffi.ProgressListener
import app.unsee.ffi.Scheduler
import app.unsee.ffi.UnseeException
import java.nio.ByteBuffer
import kotlinx.coroutines.CancellationException
import kotlinx.coroutines.CoroutineDispatcher
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.async
import kotlinx.coroutines.channels.Channel
import kotlinx.coroutines.coroutineScope
import kotlinx.coroutines.flow.Flow
import kotlinx.coroutines.flow.buffer
import kotlinx.coroutines.flow.channelFlow
import kotlinx.coroutines.withContext

/** One event of [Unsee.generateWithProgress]. */
sealed interface GenerationEvent {
    data class Progress(val step: Int, val total: Int) : GenerationEvent
    class Done(val image: GeneratedImage) : GenerationEvent
}

/**
 * Coroutine wrapper over the generated uniffi bindings (`app.unsee.ffi`). Pure Kotlin + kotlinx-coroutines: no
 * Android dependency, so it is tested on the host JVM.
 *
 * Every call runs on [dispatcher]. Cancelling the calling coroutine cancels the native work through a
 * [CancelToken]: the runtime stops after the denoising step in progress and the coroutine ends with a
 * [CancellationException]. Errors are thrown as `UnseeException` subclasses. Calls on one engine run one at a time.
 */
class Unsee(
    config: EngineConfig,
    private val dispatcher: CoroutineDispatcher = Dispatchers.Default,
) : AutoCloseable {
    /** The underlying uniffi engine (for calls the wrapper does not cover). */
    val engine: Engine = Engine(config)

    /** Generates one image; [onProgress] is called after every denoising step (on a worker thread). */
    suspend fun generate(
        request: GenerateRequest,
        onProgress: (step: Int, total: Int) -> Unit = { _, _ -> },
    ): GeneratedImage = cancellable { token ->
        val listener = object : ProgressListener {
            override fun onStep(step: Int, total: Int) = onProgress(step, total)
        }
        engine.generate(request, listener, token)
    }

    /** A cold flow: [GenerationEvent.Progress] after each step, then one [GenerationEvent.Done]. */
    fun generateWithProgress(request: GenerateRequest): Flow<GenerationEvent> = channelFlow {
        val image = generate(request) { step, total -> trySend(GenerationEvent.Progress(step, total)) }
        send(GenerationEvent.Done(image))
    }.buffer(Channel.UNLIMITED)

    /** Erases the concepts of [specToml] from this engine's model (and saves the erasure file to [saveTo]). */
    suspend fun erase(specToml: String, saveTo: String? = null): ErasureSummary =
        withContext(dispatcher) { engine.erase(specToml, saveTo) }

    /** Leakage and drift of the erasures in effect, on the concepts and preserve set of [specToml]. */
    suspend fun audit(specToml: String): AuditReport = withContext(dispatcher) { engine.audit(specToml) }

    /** Device, precision, components and the erased concepts (for a concept-filter list). */
    fun info(): EngineInfo = engine.info()

    /**
     * The zero-copy path: renders into [out], a direct buffer of exactly width × height × 4 bytes (RGBA8). No
     * progress; not cancellable once started.
     */
    suspend fun renderInto(request: GenerateRequest, out: ByteBuffer) = withContext(dispatcher) {
        UnseeNative.renderInto(
            engine.jniHandle(), request.prompt, request.negativePrompt, request.steps, request.guidance,
            request.seed, request.width ?: 0, request.height ?: 0, request.scheduler.jniName(), out,
        )
    }

    override fun close() = engine.close()

    private suspend fun <T> cancellable(block: (CancelToken) -> T): T = coroutineScope {
        val token = CancelToken()
        val work = async(dispatcher) {
            try {
                block(token)
            } catch (e: UnseeException.Cancelled) {
                // Only this wrapper holds the token, so this is the caller's cancellation coming back.
                throw CancellationException("generation cancelled").apply { initCause(e) }
            }
        }
        try {
            work.await()
        } catch (e: CancellationException) {
            // The caller was cancelled: stop the native loop at its next step; coroutineScope then waits for it.
            token.cancel()
            throw e
        }
    }
}

/** The scheduler names of the JNI path (and of `unsee generate --scheduler`). */
fun Scheduler.jniName(): String = when (this) {
    Scheduler.DDIM -> "ddim"
    Scheduler.EULER_ANCESTRAL -> "euler-a"
    Scheduler.DPM_SOLVER_MULTISTEP -> "dpmpp-2m"
    Scheduler.DPM_SOLVER_MULTISTEP_KARRAS -> "dpmpp-2m-karras"
    Scheduler.LCM -> "lcm"
}
