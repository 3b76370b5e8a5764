import SwiftUI
import Unsee

/// Same screens as the Android sample: prompt, the erased concepts of the loaded bundle, progress, image, cancel.
struct ContentView: View {
    @State private var engine: UnseeEngine?
    @State private var status = "loading the model…"
    @State private var prompt = "a red circle"
    @State private var progress = 0.0
    @State private var image: CGImage?
    @State private var task: Task<Void, Never>?

    var body: some View {
        VStack(alignment: .leading, spacing: 12) {
            TextField("Prompt", text: $prompt).textFieldStyle(.roundedBorder)
            let erased = (try? engine?.info().erasures) ?? nil
            let concepts = (erased ?? []).flatMap { e in zip(e.concepts, e.replacements).map { ($0, $1) } }
            Text(concepts.isEmpty ? "No concepts erased" : "Erased concepts").font(.headline)
            ScrollView(.horizontal) {
                HStack {
                    ForEach(concepts, id: \.0) { concept, replacement in
                        Text(replacement.isEmpty ? concept : "\(concept) → \(replacement)")
                            .padding(6).background(.thinMaterial, in: Capsule())
                    }
                }
            }
            HStack {
                Button("Generate") { generate() }.disabled(engine == nil || task != nil)
                Button("Cancel") { task?.cancel() }.disabled(task == nil)
            }
            ProgressView(value: progress)
            Text(status).font(.caption)
            if let image { Image(decorative: image, scale: 1).resizable().scaledToFit() }
            Spacer()
        }
        .padding()
        .task { await load() }
    }

    private func load() async {
        do {
            // Guarded: only a bundle signed by the key the app ships with loads, every file is checked against its
            // manifest as it is read, and the bundle must erase "red circle".
            let bundle = Bundle.main.resourceURL!.appendingPathComponent("sample-bundle").path
            let trusted = try String(contentsOf: Bundle.main.url(forResource: "sample", withExtension: "pub")!,
                                     encoding: .utf8)
            let config = EngineConfig(modelPath: bundle, device: .auto, precision: .f32,
                                      trustedKeys: [trusted], requiredConcepts: ["red circle"])
            engine = try await Task.detached { try UnseeEngine(config: config) }.value
            status = "ready on \((try? engine?.info().device) ?? "?")"
        } catch {
            status = "could not load: \(error)"
        }
    }

    private func generate() {
        guard let engine else { return }
        let request = GenerateRequest(prompt: prompt, steps: 20, seed: 7, scheduler: .ddim)
        task = Task {
            defer { task = nil }
            do {
                for try await event in engine.generateWithProgress(request) {
                    switch event {
                    case let .progress(step, total): progress = Double(step) / Double(total)
                    case let .done(img): image = cgImage(img)
                    }
                }
                status = "done"
            } catch is CancellationError {
                status = "cancelled"
            } catch {
                status = "error: \(error)"
            }
        }
    }
}

private func cgImage(_ img: GeneratedImage) -> CGImage? {
    guard let provider = CGDataProvider(data: img.rgba as CFData) else { return nil }
    return CGImage(width: Int(img.width), height: Int(img.height), bitsPerComponent: 8, bitsPerPixel: 32,
                   bytesPerRow: Int(img.width) * 4, space: CGColorSpaceCreateDeviceRGB(),
                   bitmapInfo: CGBitmapInfo(rawValue: CGImageAlphaInfo.noneSkipLast.rawValue),
                   provider: provider, decode: nil, shouldInterpolate: false, intent: .defaultIntent)
}
