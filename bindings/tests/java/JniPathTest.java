// The hand-written JNI path (direct ByteBuffer) against the uniffi path, from plain Java on the host JVM.
// Compiled with javac and run by `cargo test -p unsee-ffi --test foreign` (env UNSEE_REPO = repository root).

import app.unsee.UnseeNative;
import app.unsee.UnseeNativeException;
import app.unsee.ffi.DeviceKind;
import app.unsee.ffi.Engine;
import app.unsee.ffi.EngineConfig;
import app.unsee.ffi.GenerateRequest;
import app.unsee.ffi.GeneratedImage;
import app.unsee.ffi.Precision;
import app.unsee.ffi.Scheduler;
import java.nio.ByteBuffer;
import java.nio.file.Paths;
import java.util.Arrays;
import java.util.List;

public class JniPathTest {
    static void check(boolean ok, String what) {
        if (!ok) throw new AssertionError(what);
    }

    interface Call {
        void run();
    }

    static UnseeNativeException expectError(String kind, Call call) {
        try {
            call.run();
        } catch (UnseeNativeException e) {
            check(e.kind.equals(kind), "expected " + kind + ", got " + e.getMessage());
            return e;
        }
        throw new AssertionError("expected UnseeNativeException " + kind + ", nothing thrown");
    }

    public static void main(String[] args) throws Exception {
        String tiny = Paths.get(System.getenv("UNSEE_REPO"), "models", "tiny-sd").toString();
        Engine engine = new Engine(new EngineConfig(tiny, null, List.of(), DeviceKind.CPU, Precision.F32, List.of(), List.of(), List.of(), false));
        int steps = 4;
        long seed = 11L;
        for (Scheduler s : new Scheduler[] {Scheduler.DDIM, Scheduler.EULER_ANCESTRAL}) {
            String name = s == Scheduler.DDIM ? "ddim" : "euler-a";
            // The uniffi path ...
            GenerateRequest req = new GenerateRequest("a green star", "blurry", steps, 6.0, seed, 32, 48, s);
            GeneratedImage viaUniffi = engine.generate(req, null, null);
            check(viaUniffi.getRgba().length == 32 * 48 * 4, "uniffi size");
            // ... and the JNI path into a direct buffer (its position is ignored: written from address 0).
            ByteBuffer out = ByteBuffer.allocateDirect(32 * 48 * 4);
            out.position(100);
            UnseeNative.renderInto(engine.jniHandle(), "a green star", "blurry", steps, 6.0, seed, 32, 48, name, out);
            byte[] viaJni = new byte[out.capacity()];
            out.position(0);
            out.get(viaJni);
            check(Arrays.equals(viaJni, viaUniffi.getRgba()), "JNI pixels differ from uniffi pixels (" + name + ")");
        }

        long handle = engine.jniHandle();
        check(handle == engine.jniHandle(), "handle is stable");
        // Native size (width/height 0) is 64x64 for the embedded model.
        ByteBuffer native64 = ByteBuffer.allocateDirect(64 * 64 * 4);
        UnseeNative.renderInto(handle, "a red circle", null, 2, 7.5, 1L, 0, 0, "ddim", native64);
        // Bad input is a typed exception, never a crash.
        expectError("InvalidRequest", () -> UnseeNative.renderInto(handle, "x", "", 2, 7.5, 1L, 0, 0, "ddim",
                ByteBuffer.allocateDirect(10)));
        expectError("InvalidRequest", () -> UnseeNative.renderInto(handle, "x", "", 2, 7.5, 1L, 0, 0, "ddim",
                ByteBuffer.allocate(64 * 64 * 4)));
        expectError("InvalidRequest", () -> UnseeNative.renderInto(handle, "x", "", 2, 7.5, 1L, 0, 0, "plms",
                native64));
        expectError("InvalidRequest", () -> UnseeNative.renderInto(handle, null, "", 2, 7.5, 1L, 0, 0, "ddim",
                native64));
        expectError("InvalidRequest", () -> UnseeNative.renderInto(handle, "x", "", 0, 7.5, 1L, 0, 0, "ddim",
                native64));
        expectError("InvalidRequest", () -> UnseeNative.renderInto(handle, "x", "", 2, 7.5, 1L, 0, 0, "ddim", null));
        expectError("InvalidRequest", () -> UnseeNative.renderInto(987654321L, "x", "", 2, 7.5, 1L, 0, 0, "ddim",
                native64));
        // A handle outlives nothing: once the engine is closed it is refused.
        engine.close();
        UnseeNativeException gone = expectError("InvalidRequest",
                () -> UnseeNative.renderInto(handle, "x", "", 2, 7.5, 1L, 0, 0, "ddim", native64));
        check(gone.getMessage().contains("no live engine"), gone.getMessage());
        System.out.println("JNI path test: OK");
    }
}
