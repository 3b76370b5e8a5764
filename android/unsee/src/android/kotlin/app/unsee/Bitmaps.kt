package app.unsee

import android.graphics.Bitmap
import app.unsee.ffi.GenerateRequest
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.withContext

/**
 * Renders straight into a new `ARGB_8888` bitmap through the NDK bitmap API (`UnseeNative.renderIntoBitmap`): the
 * runtime writes the pixels once, into the bitmap's own memory. No progress; use [Unsee.generate] for that.
 * Android only (this file is not part of the host-JVM tests).
 */
suspend fun Unsee.renderBitmap(request: GenerateRequest, width: Int, height: Int): Bitmap =
    withContext(Dispatchers.Default) {
        val bitmap = Bitmap.createBitmap(width, height, Bitmap.Config.ARGB_8888)
        UnseeNative.renderIntoBitmap(
            engine.jniHandle(), request.prompt, request.negativePrompt, request.steps, request.guidance,
            request.seed, width, height, request.scheduler.jniName(), bitmap,
        )
        bitmap
    }

/** The RGBA8 pixels of a generated image as a bitmap (one copy; for the uniffi path's `ByteArray`). */
fun app.unsee.ffi.GeneratedImage.toBitmap(): Bitmap =
    Bitmap.createBitmap(width, height, Bitmap.Config.ARGB_8888).apply {
        copyPixelsFromBuffer(java.nio.ByteBuffer.wrap(rgba))
    }
