package app.unsee;

/** An error from the JNI path. {@link #kind} is the name of the uniffi {@code UnseeException} variant. */
public final class UnseeNativeException extends RuntimeException {
    /** ModelNotFound, InvalidModel, ErasureMismatch, InvalidErasureFile, DeviceUnavailable, InvalidRequest, Cancelled, Io, BundleRefused, GuardViolation or Internal. */
    public final String kind;

    public UnseeNativeException(String kind, String message) {
        super(kind + ": " + message);
        this.kind = kind;
    }
}
