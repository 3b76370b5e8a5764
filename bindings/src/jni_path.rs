//! The hand-written JNI fast path: renders straight into memory the caller owns — a direct `java.nio.ByteBuffer`
//! (everywhere) or an `android.graphics.Bitmap` (Android, through the NDK bitmap API) — so the pixels are written
//! once, by the VAE decode, with no intermediate array and no copy across the boundary.
//!
//! Java side: `android/unsee/src/main/java/app/unsee/UnseeNative.java`. The engine comes from the uniffi API
//! (`Engine.jniHandle()`); errors are thrown as `app.unsee.UnseeNativeException(kind, message)` with the kinds of
//! [`UnseeError`]; a panic becomes kind `Internal`. Progress and cancellation are not offered on this path.

use jni::JNIEnv;
#[cfg(target_os = "android")]
use jni::objects::JObject;
use jni::objects::{JByteBuffer, JClass, JString, JValue};
use jni::sys::{jdouble, jint, jlong};

use crate::{GenerateRequest, Scheduler, UnseeError, engine_for_handle, guard};

const EXCEPTION_CLASS: &str = "app/unsee/UnseeNativeException";

fn kind(e: &UnseeError) -> &'static str {
    match e {
        UnseeError::ModelNotFound(_) => "ModelNotFound",
        UnseeError::InvalidModel(_) => "InvalidModel",
        UnseeError::ErasureMismatch(_) => "ErasureMismatch",
        UnseeError::InvalidErasureFile(_) => "InvalidErasureFile",
        UnseeError::DeviceUnavailable(_) => "DeviceUnavailable",
        UnseeError::InvalidRequest(_) => "InvalidRequest",
        UnseeError::Cancelled(_) => "Cancelled",
        UnseeError::Io(_) => "Io",
        UnseeError::BundleRefused(_) => "BundleRefused",
        UnseeError::GuardViolation(_) => "GuardViolation",
        UnseeError::Internal(_) => "Internal",
    }
}

/// Throws `UnseeNativeException(kind, message)`; falls back to a plain RuntimeException if that class is missing.
fn throw(env: &mut JNIEnv, e: &UnseeError) {
    let (k, m) = (kind(e), e.to_string());
    let thrown = (|| -> jni::errors::Result<()> {
        let (jk, jm) = (env.new_string(k)?, env.new_string(&m)?);
        let obj = env.new_object(EXCEPTION_CLASS, "(Ljava/lang/String;Ljava/lang/String;)V",
                                 &[JValue::Object(&jk), JValue::Object(&jm)])?;
        env.throw(jni::objects::JThrowable::from(obj))
    })();
    if thrown.is_err() {
        let _ = env.exception_clear();
        let _ = env.throw_new("java/lang/RuntimeException", format!("{k}: {m}"));
    }
}

fn string(env: &mut JNIEnv, s: &JString, what: &str) -> Result<String, UnseeError> {
    if s.is_null() {
        return Err(UnseeError::InvalidRequest(format!("{what} is null")));
    }
    env.get_string(s).map(Into::into).map_err(|e| UnseeError::InvalidRequest(format!("{what}: {e}")))
}

/// A scheduler by the names the CLI uses (core's one table of names).
fn scheduler(name: &str) -> Result<Scheduler, UnseeError> {
    name.parse::<unsee::scheduler::SchedulerKind>().map(Scheduler::from).map_err(UnseeError::InvalidRequest)
}

/// The request as the uniffi path would build it (so both paths render identical pixels). `width`/`height` ≤ 0
/// mean the model's native size.
#[allow(clippy::too_many_arguments)]
fn request(env: &mut JNIEnv, prompt: &JString, negative: &JString, steps: jint, guidance: jdouble, seed: jlong,
           width: jint, height: jint, sched: &JString) -> Result<GenerateRequest, UnseeError> {
    Ok(GenerateRequest {
        prompt: string(env, prompt, "prompt")?,
        negative_prompt: if negative.is_null() { String::new() } else { string(env, negative, "negativePrompt")? },
        steps,
        guidance,
        seed,
        width: (width > 0).then_some(width),
        height: (height > 0).then_some(height),
        scheduler: scheduler(&string(env, sched, "scheduler")?)?,
    })
}

/// Renders into `out[..]` (exactly width × height × 4 bytes) with the engine behind `handle`.
fn render(handle: jlong, req: &GenerateRequest, out: &mut [u8]) -> Result<(), UnseeError> {
    let engine = engine_for_handle(handle)?;
    let req = req.to_core()?;
    let guard = engine.lock();
    guard.generate(&req, Default::default(), &mut |_| unsee::pipeline::Control::Continue,
                   unsee::pipeline::Target::Buffer(out))?;
    Ok(())
}

/// `static native void renderInto(long engine, String prompt, String negativePrompt, int steps, double guidance,
/// long seed, int width, int height, String scheduler, java.nio.ByteBuffer out)`: `out` must be a direct buffer
/// whose capacity is exactly width × height × 4 (RGBA8, row-major); it is written from its address 0, whatever its
/// position. The caller must not touch the buffer until the call returns.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub extern "system" fn Java_app_unsee_UnseeNative_renderInto<'l>(
    mut env: JNIEnv<'l>, _class: JClass<'l>, handle: jlong, prompt: JString<'l>, negative: JString<'l>, steps: jint,
    guidance: jdouble, seed: jlong, width: jint, height: jint, sched: JString<'l>, out: JByteBuffer<'l>,
) {
    let result = guard(|| {
        let req = request(&mut env, &prompt, &negative, steps, guidance, seed, width, height, &sched)?;
        if out.is_null() {
            return Err(UnseeError::InvalidRequest("the output buffer is null".into()));
        }
        let not_direct = |e: jni::errors::Error| {
            UnseeError::InvalidRequest(format!("the output must be a direct ByteBuffer (ByteBuffer.allocateDirect): {e}"))
        };
        let addr = env.get_direct_buffer_address(&out).map_err(not_direct)?;
        let len = env.get_direct_buffer_capacity(&out).map_err(not_direct)?;
        // SAFETY: a direct buffer's memory stays valid and fixed while the ByteBuffer object is alive, which the
        // JNI local reference guarantees for the duration of this call; the caller does not touch it meanwhile.
        let pixels = unsafe { std::slice::from_raw_parts_mut(addr, len) };
        render(handle, &req, pixels)
    });
    if let Err(e) = result {
        throw(&mut env, &e);
    }
}

/// `static native void renderIntoBitmap(long engine, …same…, android.graphics.Bitmap bitmap)`: the bitmap must
/// be mutable, `ARGB_8888` (which is RGBA byte order in memory) and exactly the requested size.
#[cfg(target_os = "android")]
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub extern "system" fn Java_app_unsee_UnseeNative_renderIntoBitmap<'l>(
    mut env: JNIEnv<'l>, _class: JClass<'l>, handle: jlong, prompt: JString<'l>, negative: JString<'l>, steps: jint,
    guidance: jdouble, seed: jlong, width: jint, height: jint, sched: JString<'l>, bitmap: JObject<'l>,
) {
    let result = guard(|| {
        let req = request(&mut env, &prompt, &negative, steps, guidance, seed, width, height, &sched)?;
        if bitmap.is_null() {
            return Err(UnseeError::InvalidRequest("the bitmap is null".into()));
        }
        android_bitmap::with_pixels(&env, &bitmap, |pixels| render(handle, &req, pixels))
    });
    if let Err(e) = result {
        throw(&mut env, &e);
    }
}

/// The NDK bitmap API (`libjnigraphics`, `<android/bitmap.h>`).
#[cfg(target_os = "android")]
mod android_bitmap {
    use std::ffi::c_void;

    use jni::JNIEnv;
    use jni::objects::JObject;

    use crate::UnseeError;

    #[repr(C)]
    #[derive(Default)]
    struct AndroidBitmapInfo {
        width: u32,
        height: u32,
        stride: u32,
        format: i32,
        flags: u32,
    }

    const ANDROID_BITMAP_FORMAT_RGBA_8888: i32 = 1;
    const ANDROID_BITMAP_RESULT_SUCCESS: i32 = 0;

    #[link(name = "jnigraphics")]
    unsafe extern "C" {
        fn AndroidBitmap_getInfo(env: *mut jni::sys::JNIEnv, bitmap: jni::sys::jobject, info: *mut AndroidBitmapInfo)
            -> i32;
        fn AndroidBitmap_lockPixels(env: *mut jni::sys::JNIEnv, bitmap: jni::sys::jobject, addr: *mut *mut c_void)
            -> i32;
        fn AndroidBitmap_unlockPixels(env: *mut jni::sys::JNIEnv, bitmap: jni::sys::jobject) -> i32;
    }

    /// Locks the bitmap's pixels, hands them to `f` as one RGBA8 slice, and unlocks them whatever `f` returns.
    pub fn with_pixels(env: &JNIEnv, bitmap: &JObject,
                       f: impl FnOnce(&mut [u8]) -> Result<(), UnseeError>) -> Result<(), UnseeError> {
        let (raw_env, raw_bitmap) = (env.get_raw(), bitmap.as_raw());
        let mut info = AndroidBitmapInfo::default();
        // SAFETY: valid JNIEnv and a non-null local reference to a Bitmap, as the NDK API requires.
        if unsafe { AndroidBitmap_getInfo(raw_env, raw_bitmap, &mut info) } != ANDROID_BITMAP_RESULT_SUCCESS {
            return Err(UnseeError::InvalidRequest("AndroidBitmap_getInfo failed (not a Bitmap?)".into()));
        }
        if info.format != ANDROID_BITMAP_FORMAT_RGBA_8888 {
            return Err(UnseeError::InvalidRequest("the bitmap must be Bitmap.Config.ARGB_8888".into()));
        }
        if info.stride != info.width * 4 {
            return Err(UnseeError::InvalidRequest(format!(
                "the bitmap rows are padded (stride {} for width {}); create it with Bitmap.createBitmap",
                info.stride, info.width
            )));
        }
        let mut addr: *mut c_void = std::ptr::null_mut();
        // SAFETY: as above; on success `addr` points to height × stride bytes until unlockPixels.
        if unsafe { AndroidBitmap_lockPixels(raw_env, raw_bitmap, &mut addr) } != ANDROID_BITMAP_RESULT_SUCCESS
            || addr.is_null()
        {
            return Err(UnseeError::InvalidRequest("AndroidBitmap_lockPixels failed (recycled bitmap?)".into()));
        }
        let len = info.height as usize * info.stride as usize;
        // SAFETY: the pixels stay locked (fixed, valid, ours) until the unlock below.
        let pixels = unsafe { std::slice::from_raw_parts_mut(addr.cast::<u8>(), len) };
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(pixels)));
        // SAFETY: paired with the successful lock above.
        unsafe { AndroidBitmap_unlockPixels(raw_env, raw_bitmap) };
        result.unwrap_or_else(|p| std::panic::resume_unwind(p))
    }
}
