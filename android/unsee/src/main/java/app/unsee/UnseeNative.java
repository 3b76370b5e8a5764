package app.unsee;

import java.nio.ByteBuffer;

/**
 * The zero-copy render path (hand-written JNI in {@code bindings/src/jni_path.rs}): pixels are written by the
 * runtime straight into memory the caller owns. The engine comes from the uniffi API: {@code engine.jniHandle()}.
 * Errors are thrown as {@link UnseeNativeException}. No progress or cancellation here: use the uniffi
 * {@code Engine.generate} (or the {@code Unsee} coroutine wrapper) when you need them.
 */
public final class UnseeNative {
    static {
        System.loadLibrary("unsee_ffi");
    }

    private UnseeNative() {}

    /**
     * Renders RGBA8 pixels (row-major, alpha 255) into {@code out}, a direct buffer whose capacity is exactly
     * width × height × 4 bytes; it is written from address 0 whatever its position. {@code width}/{@code height}
     * ≤ 0 mean the model's native size. {@code scheduler}: "ddim", "euler-a", "dpmpp-2m" or "dpmpp-2m-karras".
     */
    public static native void renderInto(long engine, String prompt, String negativePrompt, int steps,
                                         double guidance, long seed, int width, int height, String scheduler,
                                         ByteBuffer out);

    /**
     * Android only: renders into a mutable {@code ARGB_8888} bitmap of exactly the requested size, through the NDK
     * bitmap API (no copy). The parameter is typed {@code Object} so this class compiles without the Android SDK.
     */
    public static native void renderIntoBitmap(long engine, String prompt, String negativePrompt, int steps,
                                               double guidance, long seed, int width, int height, String scheduler,
                                               Object bitmap);
}
