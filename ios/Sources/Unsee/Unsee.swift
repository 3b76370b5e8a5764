import Foundation

/// One event of `UnseeEngine.generateWithProgress`.
public enum GenerationEvent: Sendable {
    case progress(step: Int, total: Int)
    case done(GeneratedImage)
}

/// Async wrapper over the generated bindings (`Engine`, `CancelToken`, `ProgressListener`).
///
/// Work runs off the caller's actor. Cancelling the calling `Task` cancels the native work through a `CancelToken`:
/// the runtime stops after the denoising step in progress and the call throws `CancellationError`. Other failures
/// are thrown as `UnseeError`. Calls on one engine run one at a time.
public final class UnseeEngine: @unchecked Sendable {
    /// The underlying uniffi engine (for calls the wrapper does not cover).
    public let engine: Engine

    public init(config: EngineConfig) throws {
        engine = try Engine(config: config)
    }

    /// Generates one image; `onProgress` is called after every denoising step, on a background thread.
    public func generate(
        _ request: GenerateRequest,
        onProgress: @escaping @Sendable (Int, Int) -> Void = { _, _ in }
    ) async throws -> GeneratedImage {
        let token = CancelToken()
        let engine = self.engine
        return try await withTaskCancellationHandler {
            try await Task.detached(priority: .userInitiated) {
                do {
                    return try engine.generate(request: request, progress: Listener(onProgress), cancel: token)
                } catch UnseeError.Cancelled(_) {
                    throw CancellationError()
                }
            }.value
        } onCancel: {
            token.cancel()
        }
    }

    /// Progress after each step, then the image; cancelling the consuming task cancels the generation.
    public func generateWithProgress(_ request: GenerateRequest) -> AsyncThrowingStream<GenerationEvent, Error> {
        AsyncThrowingStream { continuation in
            let task = Task {
                do {
                    let image = try await self.generate(request) { step, total in
                        continuation.yield(.progress(step: step, total: total))
                    }
                    continuation.yield(.done(image))
                    continuation.finish()
                } catch {
                    continuation.finish(throwing: error)
                }
            }
            continuation.onTermination = { _ in task.cancel() }
        }
    }

    /// Erases the concepts of `specToml` from this engine's model (and saves the erasure file to `saveTo`).
    public func erase(specToml: String, saveTo: String? = nil) async throws -> ErasureSummary {
        let engine = self.engine
        return try await Task.detached { try engine.erase(specToml: specToml, saveTo: saveTo) }.value
    }

    /// Leakage and drift of the erasures in effect, on the concepts and preserve set of `specToml`.
    public func audit(specToml: String) async throws -> AuditReport {
        let engine = self.engine
        return try await Task.detached { try engine.audit(specToml: specToml) }.value
    }

    /// Device, precision, components and the erased concepts (for a concept-filter list).
    public func info() throws -> EngineInfo {
        try engine.info()
    }
}

private final class Listener: ProgressListener, @unchecked Sendable {
    let onProgress: @Sendable (Int, Int) -> Void
    init(_ onProgress: @escaping @Sendable (Int, Int) -> Void) { self.onProgress = onProgress }
    func onStep(step: Int32, total: Int32) { onProgress(Int(step), Int(total)) }
}
