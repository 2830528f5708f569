import ArgumentParser
import Foundation
import QuantLab

struct EngineCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "engine",
        abstract: "Run a saved model through the engine: its traced graph in FP32, or the INT8 plan (fused integer convs), with latency and accuracy.",
        discussion: """
        The model is converted to its deploy form and traced into a graph of deploy-time ops. With --int8 it is first \
        calibrated (Q/DQ at every conv / linear, --calibrator on --calibration-batches x 32 training images of --data) and \
        the Q/DQ graph is compiled: DQ(x), DQ(w) -> Conv -> bias -> ReLU -> Q become one integer conv, and every quantizer \
        no conv absorbed is a Reformat step. --explain prints the graph and the plan. Latency is the median of --runs \
        timed runs after 3 warm-up runs at --batch. With --eval, the metric on the validation split of --data: COCO mAP \
        for a detector, top-1 for a classifier. The INT8 engine fuses convs and the upsampling transposed convs (kernel == stride); \
        max pools and channel concats run on int8 codes; linear layers and residual adds run in FP32; see ARCHITECTURE.md. \
        --unify-scales (with --int8, or on a Q/DQ --onnx file) gives the quantizers that must share a scale their group's \
        max amax; with --export-onnx it writes the unified Q/DQ graph (what a TensorRT user would build).
        """)

    @Option(help: "The model file (model.safetensors).") var model: String?
    @Option(help: "Instead of --model: an ONNX file (FP32, or symmetric int8 Q/DQ) to run through the engine; latency, --explain, --profile and --onnxruntime apply.") var onnx: String?
    @Option(help: "Dataset folder in COCO layout (calibration and --eval; default: data/shapes or data/shapes-cls).") var data: String?
    @Flag(help: "Quantize and run the INT8 plan (otherwise the FP32 graph).") var int8 = false
    @Option(help: "Calibrator for activations with --int8.") var calibrator = "entropy"
    @Option(help: "Calibration batches of 32 training images.") var calibrationBatches = 4
    @Option(help: "Batch size of the traced graph.") var batch = 1
    @Option(help: "Timed runs.") var runs = 20
    @Flag(help: "Print the traced graph and the plan.") var explain = false
    @Flag(help: "Evaluate on the validation split of --data.") var eval = false
    @Flag(help: "Time every step of the timed runs: where the time goes, Reformat steps' share, every step's median time (slowest first); with --onnxruntime, also onnxruntime's profiled time of each conv beside ours.") var profile = false
    @Option(help: "Write the traced graph as ONNX here (with --int8: the Q/DQ graph, QuantizeLinear/DequantizeLinear pairs; with --unify-scales: after unification; with --onnx: the file's graph as the engine reads it).") var exportOnnx: String?
    @Flag(help: "Also run the same graph, exported to ONNX, with onnxruntime (CPU, same threads, same input): outputs compared, latency ratio.") var onnxruntime = false
    @Option(help: "Where the plan runs: cpu, or cuda (the GPU: integer convs, Reformat steps and the float ops the device has kernels for; the rest on the CPU, named; needs make cuda and a GPU).") var device = "cpu"
    @Flag(help: "With --int8 or a Q/DQ --onnx file: give the quantizers that read one tensor (directly or through pools and concat) their group's largest amax, found from the graph (the article's scale fusion).") var unifyScales = false

    func validate() throws {
        guard (model == nil) != (onnx == nil) else { throw ValidationError("give one of --model or --onnx") }
        guard onnx == nil || (!int8 && !eval) else {
            throw ValidationError("--onnx runs the file's own Q/DQ: --int8 and --eval need --model")
        }
        guard batch >= 1, batch <= 256 else { throw ValidationError("--batch must be in 1...256, got \(batch)") }
        guard runs >= 1, runs <= 10_000 else { throw ValidationError("--runs must be in 1...10000, got \(runs)") }
        guard calibrationBatches >= 1 else { throw ValidationError("--calibration-batches must be at least 1") }
        guard !unifyScales || int8 || onnx != nil else { throw ValidationError("--unify-scales needs --int8 or a Q/DQ --onnx file (it changes the quantizers' scales)") }
        do { _ = try CalibrationMethod(parsing: calibrator) } catch { throw ValidationError("--calibrator: \(error)") }
        guard device == "cpu" || device == "cuda" else { throw ValidationError("--device must be cpu or cuda, got \(device)") }
        guard device == "cpu" || (!profile && !onnxruntime) else {
            throw ValidationError("--device cuda: --profile and --onnxruntime time the CPU plan; run them without --device")
        }
    }

    /// The plan on the GPU with --device cuda (nil on the CPU); a clear error without a device.
    func gpuPlan(_ plan: Int8Plan) throws -> CUDAPlan? {
        guard device == "cuda" else { return nil }
        if let why = CUDA.shared.unavailableReason { throw ValidationError("--device cuda: \(why); run without --device for the CPU") }
        let gpu = try CUDAPlan(plan)
        print("GPU plan (\(CUDA.shared.notice)): \(gpu.summary)")
        return gpu
    }

    func run() throws {
        if let onnx { return try runONNX(onnx) }
        let (_, saved) = try loadSavedModel(model!)
        let defaultData = { if case .classifier = saved { return "data/shapes-cls" } else { return "data/shapes" } }()
        let dataRoot = URL(fileURLWithPath: data ?? defaultData)
        let module = saved.module
        module.eval()
        module.convertToDeployForm()

        var simulator: QuantizationSimulator?
        if int8 {
            let subject = try PTQSubject.saved(saved, data: dataRoot, label: saved.kindName)
            // an RT-DETR quantizes its attention products too (PaddleSlim's conv2d + matmul_v2, exp07)
            var options = QuantizationOptions()
            if case .rtdetr = saved { options.quantizeMatMul = true }
            let sim = try QuantizationSimulator(module, options: options)
            sim.calibrate(on: try subject.calibrationImages(CalibrationPlan(batches: calibrationBatches, batchSize: 32, seed: 0)), forward: subject.forward)
            try sim.applyCalibration(try CalibrationMethod(parsing: calibrator))
            simulator = sim
        }
        defer { simulator?.remove() }
        var graph = try Graph.trace(saved, batch: batch)
        if unifyScales, let sim = simulator {
            let before = try Int8Plan(graph).reformatCount
            let changes = try QuantLab.unifyScales(sim, groups: scaleGroups(graph))
            graph = try Graph.trace(saved, batch: batch)
            printUnification(changes, reformatsBefore: before, after: try Int8Plan(graph).reformatCount)
        }
        let plan = try Int8Plan(graph)
        if let exportOnnx {
            try ONNXExport.write(graph, to: URL(fileURLWithPath: exportOnnx), name: saved.kindName)
            print("wrote \(exportOnnx) (ONNX opset \(ONNXExport.opset), \(int8 ? "Q/DQ" : "FP32") graph)")
        }
        if explain { print(graph.explain() + "\n\n" + plan.explain() + "\n") }
        print("\(saved.kindName), \(int8 ? "INT8 plan (\(plan.int8ConvCount) integer convs, \(plan.int8GemmCount) integer Gemm/MatMul, \(plan.reformatCount) Reformat steps)" : "FP32 graph"), batch \(batch); \(Kernels.summary)")

        let gpu = try gpuPlan(plan)
        let (x, median) = try timeAndProfile(plan, gpu: gpu)
        if onnxruntime {
            try compareWithOnnxRuntime(graph: graph, plan: plan, input: x, median: median)
            if int8 {
                // onnxruntime fuses a conv into QLinearConv only when a Q follows it; our Q/DQ placement (at conv
                // inputs, as pytorch-quantization and TensorRT) leaves its convs in float. Its own quantizer is the fair peer.
                let own = try onnxRuntimePeer().run(graph: graph.withoutQuantizers(), input: x, runs: runs, quantizeFirst: true)
                print(String(format: "onnxruntime INT8 quantized its own way (QDQ, u8/s8 per channel): %.2f ms, %.1f img/s (%d QLinearConv); ours / onnxruntime speed %.2fx",
                             1000 * own.medianSeconds, Double(batch) / own.medianSeconds, own.optimizedOps["QLinearConv"] ?? 0, own.medianSeconds / median))
            }
        }

        if eval {
            let runBatch = { (images: Tensor) throws -> [Tensor] in try gpu?.runBatch(images) ?? plan.runBatch(images) } // the plan timed above
            switch saved {
            case .detector(let m):
                let val = try DetectionDataset(root: dataRoot, split: "val2017")
                let (result, _) = try evaluateDetector(m, on: val, batchSize: batch, progressLabel: "engine eval") { images in
                    let out = try runBatch(images)
                    return (out[0], out[1])
                }
                print(String(format: "mAP@[.5:.95] %.4f, mAP@.5 %.4f on %d val images", result.stats[0], result.stats[1], val.count))
            case .classifier(let m):
                let val = try ClassificationDataset(root: dataRoot, split: "val2017")
                let accuracy = try top1(m, on: val, batchSize: batch) { try runBatch($0)[0] }
                print(String(format: "top-1 %.4f on %d val images", accuracy, val.count))
            case .rtdetr(let m):
                let val = try DetectionDataset(root: dataRoot, split: "val2017")
                let (result, _) = try evaluateRTDETR(m, on: val, batchSize: batch, progressLabel: "engine eval") { images in
                    let out = try runBatch(images)
                    return (out[0], out[1])
                }
                print(String(format: "mAP@[.5:.95] %.4f, mAP@.5 %.4f on %d val images", result.stats[0], result.stats[1], val.count))
            }
        }
    }

    /// The groups unified (members with their amax before, the group's amax after) and the
    /// plan's Reformat steps before and after.
    func printUnification(_ changes: [UnifiedGroup], reformatsBefore: Int, after: Int) {
        for c in changes {
            print("unified: " + zip(c.names, c.before).map { String(format: "%@ %.4g", $0, $1) }.joined(separator: ", ") + String(format: " -> %.4g", c.after))
        }
        print("scale unification: \(changes.count) groups, Reformat steps \(reformatsBefore) -> \(after)")
    }

    /// Latency: the median of --runs timed runs after warm-up, on a fixed input of the graph's
    /// shape; with --profile, where the time goes; with --device cuda, the GPU plan's latency
    /// (the input copied in, the outputs out) and how far its outputs are from the CPU
    /// plan's. Returns the input and the median.
    func timeAndProfile(_ plan: Int8Plan, gpu: CUDAPlan? = nil) throws -> (Tensor, Double) {
        var rng = SeededGenerator(seed: 0)
        let shape = plan.graph.values[plan.graph.inputs[0]].shape
        let x = Tensor.uniform(shape, low: 0, high: 1, rng: &rng)
        let median = try gpu?.medianLatency([x], runs: runs) ?? plan.medianLatency([x], runs: runs)
        print(String(format: "latency %.2f ms (median of %d), %.1f img/s%@", 1000 * median, runs, Double(shape[0]) / median, gpu == nil ? "" : " on the GPU"))
        if let gpu {
            let agree = zip(try gpu.run([x]), try plan.run([x])).map { relativeMaxDifference($0, $1) }.max() ?? .infinity
            print(String(format: "GPU plan vs CPU plan: outputs differ by %.1e (max |diff| / max |output|)", agree))
        }
        if profile {
            plan.profile = true
            for _ in 0..<runs { _ = try plan.run([x]) }
            print(plan.profileReport(top: plan.steps.count)) // every step: the slowest first
            if let peak = try Kernels.peakRates(), let line = plan.convRatesReport(against: peak) { print(line) }
            if !onnxruntime { plan.profile = false } // else compareWithOnnxRuntime reads the samples, then turns it off
        }
        return (x, median)
    }

    func onnxRuntimePeer() throws -> OnnxRuntimePeer {
        guard let peer = OnnxRuntimePeer.locate(), peer.isAvailable else {
            throw ValidationError("--onnxruntime: no Python with onnxruntime (run `make venv`, from the repository root)")
        }
        return peer
    }

    /// onnxruntime on the same graph (exported) and input: outputs compared, latency ratio.
    func compareWithOnnxRuntime(graph: Graph, plan: Int8Plan, input x: Tensor, median: Double) throws {
        let ours = try plan.run([x])
        let ort = try onnxRuntimePeer().run(graph: graph, input: x, runs: runs, profileRuns: profile ? runs : 0)
        let agreement = zip(ours, ort.outputs).map { String(format: "%.2e", relativeMaxDifference($0, $1)) }.joined(separator: ", ")
        let kind = graph.opCounts["QDQ"] == nil ? "FP32" : "Q/DQ"
        print(String(format: "onnxruntime %@ on the same %@ graph: latency %.2f ms, %.1f img/s (%d QLinearConv); ours / onnxruntime speed %.2fx; outputs differ by %@ (max |diff| / max |output|)",
                     ort.version, kind, 1000 * ort.medianSeconds, Double(batch) / ort.medianSeconds, ort.optimizedOps["QLinearConv"] ?? 0,
                     ort.medianSeconds / median, agreement))
        if profile { // --profile: the same comparison layer by layer
            print(LayerComparison(plan: plan, peer: ort.layerSeconds).report(peerName: "onnxruntime", top: 12, unprofiled: (median, ort.medianSeconds)))
            plan.profile = false
        }
    }

    /// --onnx: an ONNX file through the engine as it is (its Q/DQ, if any, compiled by Int8Plan).
    func runONNX(_ path: String) throws {
        var graph = try ONNXImport.graph(from: URL(fileURLWithPath: path))
        guard graph.inputs.count == 1 else { throw ValidationError("--onnx: the engine runs models with one input, this one has \(graph.inputs.count)") }
        if unifyScales {
            guard graph.opCounts["QDQ"] != nil else { throw ValidationError("--unify-scales: \(path) has no Q/DQ nodes") }
            let before = try Int8Plan(graph).reformatCount
            let (unified, changes) = try graph.unifyingScales(scaleGroups(graph))
            graph = unified
            printUnification(changes, reformatsBefore: before, after: try Int8Plan(graph).reformatCount)
        }
        if let exportOnnx {
            try ONNXExport.write(graph, to: URL(fileURLWithPath: exportOnnx), name: URL(fileURLWithPath: path).deletingPathExtension().lastPathComponent)
            print("wrote \(exportOnnx) (ONNX opset \(ONNXExport.opset)\(unifyScales ? ", scales unified" : ""))")
        }
        let plan = try Int8Plan(graph)
        if explain { print(graph.explain() + "\n\n" + plan.explain() + "\n") }
        let gpu = try gpuPlan(plan)
        print("\(path): input \(graph.values[graph.inputs[0]].shape), \(graph.nodes.count) ops, \(graph.opCounts["QDQ"] == nil ? "FP32 graph" : "INT8 plan (\(plan.int8ConvCount) integer convs, \(plan.int8GemmCount) integer Gemm/MatMul, \(plan.reformatCount) Reformat steps)"); \(Kernels.summary)")
        let (x, median) = try timeAndProfile(plan, gpu: gpu)
        if onnxruntime { try compareWithOnnxRuntime(graph: graph, plan: plan, input: x, median: median) }
    }
}
