// The generated Kotlin bindings and the coroutine wrapper of android/, on the host JVM through JNA.
// Compiled and run by `cargo test -p unsee-ffi --test foreign` (env UNSEE_REPO = repository root).
package app.unsee.test

import app.unsee.GenerationEvent
import app.unsee.Unsee
import app.unsee.ffi.DeviceKind
import app.unsee.ffi.Engine
import app.unsee.ffi.EngineConfig
import app.unsee.ffi.GenerateRequest
import app.unsee.ffi.Precision
import app.unsee.ffi.Scheduler
import app.unsee.ffi.UnseeException
import java.io.File
import java.nio.ByteBuffer
import kotlinx.coroutines.CompletableDeferred
import kotlinx.coroutines.launch
import kotlinx.coroutines.runBlocking
import kotlinx.coroutines.withTimeout

private val repo = System.getenv("UNSEE_REPO") ?: error("UNSEE_REPO not set")
private val tiny = File(repo, "models/tiny-sd").path

private fun check(ok: Boolean, what: () -> String) {
    if (!ok) throw AssertionError(what())
}

private inline fun <reified E : Throwable> expect(block: () -> Unit): E {
    try {
        block()
    } catch (e: Throwable) {
        if (e is E) return e
        throw AssertionError("expected ${E::class.simpleName}, got $e", e)
    }
    throw AssertionError("expected ${E::class.simpleName}, nothing thrown")
}

private fun request(steps: Int = 4, seed: Long = 7) =
    GenerateRequest(prompt = "a red circle", steps = steps, seed = seed, scheduler = Scheduler.DDIM)

fun main() = runBlocking {
    val config = EngineConfig(modelPath = tiny, device = DeviceKind.CPU, precision = Precision.F32)
    Unsee(config).use { unsee ->
        // suspend generate with a progress callback
        val steps = mutableListOf<Pair<Int, Int>>()
        val image = unsee.generate(request()) { s, t -> synchronized(steps) { steps.add(s to t) } }
        check(image.width == 64 && image.height == 64 && image.rgba.size == 64 * 64 * 4) { "size $image" }
        check(steps == listOf(1 to 4, 2 to 4, 3 to 4, 4 to 4)) { "progress $steps" }

        // Flow of progress then the image; same pixels as the plain call.
        val events = mutableListOf<GenerationEvent>()
        unsee.generateWithProgress(request()).collect { events.add(it) }
        check(events.dropLast(1) == (1..4).map { GenerationEvent.Progress(it, 4) }) { "events $events" }
        val done = events.last() as GenerationEvent.Done
        check(done.image.rgba.contentEquals(image.rgba)) { "flow image differs" }

        // Coroutine cancellation reaches the native loop promptly.
        val firstStep = CompletableDeferred<Unit>()
        val seen = mutableListOf<GenerationEvent>()
        val job = launch {
            unsee.generateWithProgress(request(steps = 500)).collect {
                seen.add(it)
                firstStep.complete(Unit)
            }
        }
        withTimeout(120_000) { firstStep.await() }
        val t0 = System.nanoTime()
        job.cancel()
        withTimeout(60_000) { job.join() }
        val stopMs = (System.nanoTime() - t0) / 1_000_000
        check(job.isCancelled) { "job not cancelled" }
        check(seen.size < 500 && seen.none { it is GenerationEvent.Done }) { "ran to the end: ${seen.size}" }
        println("cancelled after ${seen.size} step(s); native call returned $stopMs ms after cancel()")

        // Erase through the wrapper; info lists the erased concept; generation changes.
        val spec = """
            method = "uce"
            preserve = ["a blue square"]
            [[erase]]
            concept = "red circle"
            replace_with = "yellow ring"
        """.trimIndent()
        val summary = unsee.erase(spec)
        check(summary.concepts == listOf("red circle") && summary.savedTo == null) { "summary $summary" }
        check(unsee.info().erasures.single().concepts == listOf("red circle")) { "info ${unsee.info()}" }
        val erased = unsee.generate(request())
        check(!erased.rgba.contentEquals(image.rgba)) { "erasure changed nothing" }
        val report = unsee.audit(spec)
        check(report.concepts.single().concept == "red circle") { "audit $report" }

        // The JNI zero-copy path renders the same pixels as the uniffi path.
        val buffer = ByteBuffer.allocateDirect(64 * 64 * 4)
        unsee.renderInto(request(), buffer)
        val direct = ByteArray(buffer.capacity()).also { buffer.get(it) }
        check(direct.contentEquals(erased.rgba)) { "JNI pixels differ from uniffi pixels" }
    }

    // Errors arrive as typed exceptions.
    val notFound = expect<UnseeException.ModelNotFound> {
        Engine(EngineConfig(modelPath = "/no/such/model", device = DeviceKind.CPU, precision = Precision.F32))
    }
    check("/no/such/model" in (notFound.message ?: "")) { "message ${notFound.message}" }
    Engine(config).use { engine ->
        expect<UnseeException.InvalidRequest> { engine.generate(request(steps = 0), null, null) }
    }

    // Guarded mode: a signed bundle (built by the Rust side of the test) with its trusted key.
    val bundle = System.getenv("UNSEE_BUNDLE") ?: error("UNSEE_BUNDLE not set")
    val trusted = File(System.getenv("UNSEE_BUNDLE_KEY")).readText()
    val other = File(System.getenv("UNSEE_OTHER_KEY")).readText()
    val guarded = EngineConfig(modelPath = bundle, device = DeviceKind.CPU, precision = Precision.F32,
                               trustedKeys = listOf(trusted), requiredConcepts = listOf("red circle"))
    val guardedImage = Unsee(guarded).use { unsee ->
        val image = unsee.generate(request())
        check(image.rgba.size == image.width * image.height * 4) { "guarded image $image" }
        image
    }
    // Low memory: each network loaded for its stage only, the same picture.
    Unsee(guarded.copy(lowMemory = true)).use { unsee ->
        val image = unsee.generate(request())
        check(image.rgba.contentEquals(guardedImage.rgba)) { "the low-memory engine drew another picture" }
    }
    expect<UnseeException.BundleRefused> { Engine(guarded.copy(trustedKeys = listOf(other))) }
    expect<UnseeException.GuardViolation> { Engine(guarded.copy(requiredConcepts = listOf("dog"))) }
    expect<UnseeException.GuardViolation> { Engine(guarded.copy(textEncoderPath = tiny)) }
    println("Kotlin bindings test: OK")
}
