import Foundation
import QuantLabCore
import QuantLabEngine

/// onnxruntime (CPU) as the peer of our engine on the same ONNX file and the same input:
/// runs scripts/ort_run.py in the project's Python (`make venv` installs onnx and
/// onnxruntime there). Used by `qlab engine --onnxruntime`, `qlab bench --engine` and the
/// ONNX tests.
public struct OnnxRuntimePeer: Sendable {
    public struct Result {
        public var outputs: [Tensor]
        public var medianSeconds: Double
        public var version: String
        /// Node types of onnxruntime's optimized graph and their counts (QLinearConv: Q/DQ
        /// convs it fused into integer ones).
        public var optimizedOps: [String: Int]
        /// With `profileRuns` > 0: each layer's median seconds per run under onnxruntime's
        /// profiler, keyed by the name of the model's node it belongs to (a conv fused with its
        /// activation counts as the conv; scripts/ort_run.py's `layer_of`); else empty.
        public var layerSeconds: [String: Double] = [:]
    }

    public var python: String
    public var script: String

    /// The project's Python (`ProjectPython`) and `scripts/ort_run.py` under the current directory, or nil.
    public static func locate(python: String? = nil) -> OnnxRuntimePeer? {
        ProjectPython.script("ort_run.py").map { OnnxRuntimePeer(python: ProjectPython(python).python, script: $0) }
    }

    /// Whether the Python has onnxruntime and numpy (a quick import check; onnx, for its own
    /// quantizer and the node counts, is looked for by the script).
    public var isAvailable: Bool { ProjectPython(python).canImport("onnxruntime, numpy") }

    /// Exports `graph` to ONNX and runs it: see `run(model:...)`.
    public func run(graph: Graph, input: Tensor, runs: Int = 20, threads: Int = Kernels.threads, quantizeFirst: Bool = false, profileRuns: Int = 0) throws -> Result {
        try withScratchFolder { dir in
            let model = dir.appendingPathComponent("model.onnx")
            try ONNXExport.write(graph, to: model)
            return try run(model: model, input: input, runs: runs, threads: threads, quantizeFirst: quantizeFirst, profileRuns: profileRuns)
        }
    }

    func withScratchFolder<T>(_ body: (URL) throws -> T) throws -> T {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("quantlab-ort-\(ProcessInfo.processInfo.processIdentifier)-\(UUID().uuidString)")
        try AtomicFile.createFolder(dir)
        defer { try? FileManager.default.removeItem(at: dir) }
        return try body(dir)
    }

    /// Runs `model` on `input`. `quantizeFirst`: the model is FP32, and onnxruntime first
    /// quantizes it its own way (quantize_static, QDQ, u8 activations, s8 per-channel weights).
    /// `profileRuns` > 0: after the timed runs, that many more with onnxruntime's profiler on,
    /// for `Result.layerSeconds` (the timed runs stay unprofiled).
    public func run(model: URL, input: Tensor, runs: Int = 20, threads: Int = Kernels.threads, quantizeFirst: Bool = false, profileRuns: Int = 0) throws -> Result {
        try withScratchFolder { dir in
            try run(model: model, input: input, runs: runs, threads: threads, quantizeFirst: quantizeFirst, profileRuns: profileRuns, in: dir)
        }
    }

    func run(model: URL, input: Tensor, runs: Int, threads: Int, quantizeFirst: Bool, profileRuns: Int = 0, in dir: URL) throws -> Result {
        let inputURL = dir.appendingPathComponent("input.bin")
        try input.values.withUnsafeBufferPointer { try Data(buffer: $0).write(to: inputURL) }
        var arguments = [script, model.path, inputURL.path, input.shape.map(String.init).joined(separator: ",")]
        arguments += [dir.path, String(runs), String(threads)]
        if quantizeFirst { arguments.append("quantize") }
        if profileRuns > 0 { arguments.append("profile=\(profileRuns)") }
        let run: (output: Data, errors: String, status: Int32)
        do { run = try ProjectPython(python).run(arguments) } catch {
            throw EngineError("onnxruntime: cannot run \(python) (\(error.localizedDescription)); `make venv` installs it")
        }
        let (data, errText) = (run.output, run.errors)
        guard run.status == 0, let line = String(decoding: data, as: UTF8.self).split(separator: "\n").last,
              let obj = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any],
              let median = obj["median_s"] as? Double, let outs = obj["outputs"] as? [[String: Any]] else {
            throw EngineError("onnxruntime failed on \(model.lastPathComponent): \(errText.split(separator: "\n").suffix(3).joined(separator: " | "))")
        }
        var tensors: [Tensor] = []
        for (i, o) in outs.enumerated() {
            let shape = (o["shape"] as? [Int]) ?? []
            let raw = try Data(contentsOf: dir.appendingPathComponent("output\(i).bin"))
            let values = raw.withUnsafeBytes { Array($0.bindMemory(to: Float.self)) }
            guard values.count == shape.reduce(1, *) else { throw EngineError("onnxruntime output \(i): \(values.count) values for shape \(shape)") }
            tensors.append(try Tensor(shape: shape, values: values))
        }
        let layers = obj["layer_seconds"] as? [String: Double] ?? [:]
        if profileRuns > 0, layers.isEmpty { throw EngineError("onnxruntime on \(model.lastPathComponent): profiled, but no layer timings came back") }
        return Result(outputs: tensors, medianSeconds: median, version: obj["version"] as? String ?? "?",
                      optimizedOps: obj["optimized_ops"] as? [String: Int] ?? [:], layerSeconds: layers)
    }
}

/// Largest |a - b| over the largest |b|: how far two runs of one model disagree, as a share
/// of the output's scale.
public func relativeMaxDifference(_ a: Tensor, _ b: Tensor) -> Double {
    let (x, y) = (a.values, b.values)
    guard x.count == y.count, !x.isEmpty else { return .infinity }
    let scale = Double(y.map { abs($0) }.max() ?? 0)
    let diff = Double(zip(x, y).map { abs($0 - $1) }.max() ?? 0)
    return scale > 0 ? diff / scale : diff
}
