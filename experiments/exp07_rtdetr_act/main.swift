// exp07 — RT-DETR quantized with ACT-style QAT over conv and matmul (claims B1-B4).
//
// Claim (CLAIMS.md B1-B4): Baidu analysed RT-DETR's distributions first (activations
// concentrated, weights near-normal), then ran PaddleSlim's auto-compression — QAT with
// soft-label distillation from the FP32 model itself, quantizing conv2d and matmul — and got a
// model 4x smaller with flat mAP (R50 53.1 FP32, 52.9 PTQ of convs, 53.0 ACT) and up to 44%
// faster on a GPU. RT-DETR reads images stretched to the input size, scaled to [0, 1].
//
// Protocol: RT-DETR-lite (Sources/QuantLabModels/RTDETR, every simplification stated there)
// trained from scratch on the shapes data at 160 px (AdamW 5e-4, 24 epochs, cached as
// det-rtdetr), next to exp00's YOLOv6-style RepVGG detector. Deploy form (BN folded, Rep blocks
// fused). B1: per-layer statistics of every conv, linear and attention-product operand on 4 x 16
// training images. PTQ: entropy calibration (PaddleSlim's PTQ default is KL, the same
// criterion) on 4 x 16 images, (a) convs only — PaddleSlim's PTQ row — and (b) convs, linears and
// both operands of Q.K^T and A.V. ACT: the quantizers of (b), activations by moving-average abs
// max (r 0.9, started from a calibration pass), weights per output channel from their current
// abs max at every step; loss = soft-label cross-entropy between the class logits of the FP32
// teacher and of the student (T = 1, PaddleSlim's `soft_label`) + 5 x L2 between their boxes
// (our addition: soft_label alone says nothing about boxes); no labels; SGD momentum 0.9, weight
// decay 4e-5, cosine from 1e-4 over 300 iterations of 16 images. Baidu ran 1000 iterations from
// 3e-5 on a pretrained model; 300 at 1e-4 keeps the product lr x iterations (the distance a
// fine-tune may travel) about the same. B3: the INT8 file (int8 codes + per-channel scales,
// the rest F32) against the FP32 file; latency of our engine's FP32 and INT8 plans at batch 1;
// the INT8 plan's own mAP (does the engine compute what fake quantization promised?).
//
// Files: main.swift (the pipeline), Results.swift (what is measured, the verdicts), Report.swift
// (results/exp07.md).
//
// Run: `make exp07` (the first time RT-DETR-lite trains: 40 minutes alone on 2 AVX2 cores, 47
// when other work shares them; then 5 minutes), `make exp07 QUICK=1` (tiny model on tiny data,
// 1.5 minutes with its training).
import ArgumentParser
import Foundation
import QuantLab

struct Exp07: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "exp07_rtdetr_act",
                                                    abstract: "RT-DETR-lite: analysis, PTQ of convs / of convs and matmuls, ACT-style QAT, INT8 size and latency.")

    @Flag(help: "Tiny model and data, results to results/quick/.") var quick = false
    @Option(help: "ACT iterations (default 300, 30 with --quick).") var iterations: Int?
    @Option(help: "ACT learning rate (cosine to 0).") var lr: Float = ACTConfig().learningRate
    @Option(help: "Timed engine runs per latency (each plan, interleaved).") var runs = 200
    @Option(help: "Where datasets live.") var dataRoot = "data"
    @Option(help: "Where trained baselines are cached.") var modelsRoot = "data/models"

    func validate() throws {
        if let n = iterations { guard (1...100_000).contains(n) else { throw ValidationError("--iterations must be in 1...100000, got \(n)") } }
        guard lr > 0, lr < 1 else { throw ValidationError("--lr must be in (0, 1), got \(lr)") }
        guard (1...10_000).contains(runs) else { throw ValidationError("--runs must be in 1...10000, got \(runs)") }
    }

    func run() throws {
        let start = Date()
        let plan = Baselines.Plan(quick: quick, dataRoot: URL(fileURLWithPath: dataRoot), modelsRoot: URL(fileURLWithPath: modelsRoot))
        var r = Exp07Results()
        let calibration = CalibrationPlan(batches: 4, batchSize: quick ? 8 : 16, seed: 0)

        // MARK: - 1 Data, 2 Models (trained now if not cached)
        let (train, _) = try Baselines.detectionData(plan: plan)
        let (trained, record, val) = try Baselines.rtdetr(plan: plan)
        let fp32Result = try evaluateRTDETR(trained, on: val, progressLabel: "RT-DETR FP32 val").0
        func deployCopy() throws -> RTDETR {
            var rng = SeededGenerator(seed: 0)
            let m = RTDETR(trained.config, rng: &rng)
            try m.loadStateDict(Dictionary(uniqueKeysWithValues: trained.stateDict()))
            m.eval()
            m.convertToDeployForm()
            return m
        }
        let fp32 = try deployCopy()
        let size = fp32.config.inputSize
        r.rtdetr = .init(name: "RT-DETR-lite (hidden \(fp32.config.hidden), \(fp32.config.decoderLayers) decoder layers, \(fp32.config.queries) queries)",
                         mAP: fp32Result.mAP, mAP50: fp32Result.mAP50, parametersDeploy: fp32.parameterCount,
                         gflops: withNoGrad { FLOPCounter.count { _ = fp32(Tensor(zeros: [1, 3, size, size])) } } / 1e9,
                         trainingMinutes: record.wallSeconds / 60, epochs: record.epochs)
        let (yolo, yoloRecord, yoloVal) = try Baselines.detector(.repvgg, plan: plan)
        let yoloResult = try evaluateDetector(yolo, on: yoloVal, progressLabel: "YOLOv6 RepVGG FP32 val").0
        yolo.eval()
        yolo.convertToDeployForm()
        r.yolov6 = .init(name: "YOLOv6-style RepVGG (exp00)", mAP: yoloResult.mAP, mAP50: yoloResult.mAP50, parametersDeploy: yolo.parameterCount,
                         gflops: withNoGrad { FLOPCounter.count { _ = yolo(Tensor(zeros: [1, 3, yolo.config.inputSize, yolo.config.inputSize])) } } / 1e9,
                         trainingMinutes: yoloRecord.wallSeconds / 60, epochs: yoloRecord.epochs)
        print(String(format: "FP32: RT-DETR-lite mAP %.4f (%.2f GFLOPs), YOLOv6 RepVGG mAP %.4f (%.2f GFLOPs)", r.rtdetr!.mAP, r.rtdetr!.gflops, r.yolov6!.mAP, r.yolov6!.gflops))

        // MARK: - 3 B1: analysis first
        let batches = try detectionCalibrationBatches(train, inputSize: size, plan: calibration, resize: .stretch)
        let layers = try analyzeQuantization(fp32, batches: batches) { _ = fp32($0) }
        r.analysis = ["conv", "linear", "matmul"].compactMap { kind in
            let ls = layers.filter { $0.kind == kind }
            guard !ls.isEmpty else { return nil }
            func med(_ v: [Double]) -> Double { median(v) }
            let weighted = kind != "matmul"
            return .init(kind: kind, layers: ls.count, activationKurtosis: med(ls.map(\.activation.kurtosis)),
                         activationBeyond3Sigma: med(ls.map(\.activation.beyond3Sigma)),
                         activationMaxOverPercentile: med(ls.map { l in Double(max(abs(l.activation.min), abs(l.activation.max))) / max(l.activationAmax["percentile-99.99"] ?? .nan, 1e-12) }),
                         weightKurtosis: weighted ? med(ls.map(\.weight.kurtosis)) : nil,
                         weightBeyond3Sigma: weighted ? med(ls.map(\.weight.beyond3Sigma)) : nil,
                         weightSQNRPerChannel: weighted ? med(ls.map(\.weightSQNRPerChannel)) : nil)
        }
        let analysisTable = LayerAnalysis.markdownTable(layers)

        // MARK: - 4 B2: PTQ of convs, PTQ of convs and matmuls
        func ptq(_ name: String, matmul: Bool) throws {
            let m = try deployCopy()
            var options = QuantizationOptions()
            options.quantizeLinear = matmul
            options.quantizeMatMul = matmul
            let sim = try QuantizationSimulator(m, options: options)
            defer { sim.remove() }
            sim.calibrate { for b in batches { _ = m(b) } }
            try sim.applyCalibration(.entropy)
            let result = try evaluateRTDETR(m, on: val, progressLabel: name).0
            r.arms.append(.init(name: name, quantized: matmul ? "conv + linear + attention matmuls" : "conv", mAP: result.mAP, mAP50: result.mAP50,
                                quantizedLayers: sim.layers.count))
            print(String(format: "%@: mAP %.4f (%d quantized layers)", name, result.mAP, sim.layers.count))
        }
        try ptq("PTQ conv", matmul: false)
        try ptq("PTQ conv + matmul", matmul: true)

        // MARK: - 5 B2: ACT — QAT with soft-label distillation from the FP32 model
        let student = try deployCopy()
        var options = QuantizationOptions()
        options.quantizeMatMul = true
        let sim = try QuantizationSimulator(student, options: options)
        sim.calibrate { for b in batches { _ = student(b) } }
        try sim.applyCalibration(.movingAverage(rate: 0.9))
        let actStart = try evaluateRTDETR(student, on: val, progressLabel: "ACT start (moving-average PTQ)").0
        r.arms.append(.init(name: "ACT start", quantized: "conv + linear + attention matmuls (moving-average calibration)", mAP: actStart.mAP,
                            mAP50: actStart.mAP50, quantizedLayers: sim.layers.count))
        var act = ACTConfig()
        act.iterations = iterations ?? (quick ? 30 : 300)
        act.batchSize = quick ? 8 : 16
        act.learningRate = lr
        let actClock = Date()
        r.actLoss = try runACT(student: student, simulator: sim, teacher: fp32, train: train, config: act)
        r.actSeconds = Date().timeIntervalSince(actClock)
        r.actIterations = act.iterations
        r.actLearningRate = act.learningRate
        let actResult = try evaluateRTDETR(student, on: val, progressLabel: "ACT val").0
        r.arms.append(.init(name: "ACT", quantized: "conv + linear + attention matmuls", mAP: actResult.mAP, mAP50: actResult.mAP50, quantizedLayers: sim.layers.count))
        print(String(format: "ACT: mAP %.4f (start %.4f, FP32 %.4f)", actResult.mAP, actStart.mAP, fp32Result.mAP))

        // MARK: - 6 B3: size and engine latency
        r.fp32Bytes = try SafeTensors.encode(fp32.stateDict().map { ($0.0, .float32($0.1)) }).count
        r.int8Bytes = try Int8ModelFile.encode(student, simulator: sim).count
        let fp32Plan = try Int8Plan(try Graph.trace(fp32))
        let int8Plan = try Int8Plan(try Graph.trace(student))
        r.int8ConvSteps = int8Plan.int8ConvCount
        r.int8GemmSteps = int8Plan.int8GemmCount
        r.reformatSteps = int8Plan.steps.filter { int8Plan.reformatKind(of: $0) != nil }.count
        var rng = SeededGenerator(seed: 0)
        let x = Tensor.uniform([1, 3, size, size], low: 0, high: 1, rng: &rng)
        // the two plans run in turn, run by run, so the VM's drifts hit both alike
        let speeds = try timeInterleaved([fp32Plan, int8Plan], input: x, runs: runs)
        (r.latencyFP32Ms, r.latencyINT8Ms) = (1000 * speeds[0].medianSeconds, 1000 * speeds[1].medianSeconds)
        (r.kernelISA, r.latencyDrift) = (Kernels.isa.description, speeds.map(\.drift).max())
        if let peak = try Kernels.peakRates() { (r.peakFP32GMACs, r.peakINT8GMACs) = (peak.fp32 / 1e9, peak.int8 / 1e9) }
        // where the time goes: per-step timers over 50 runs; ms per run by kind from the step medians
        func isConv(_ s: PlanStep) -> Bool {
            switch s { case .int8Conv: return true; case .float(let n): if case .conv = n.op { return true } else { return false }; default: return false }
        }
        func isProduct(_ s: PlanStep) -> Bool {
            switch s {
            case .int8Gemm: return true
            case .float(let n): switch n.op { case .linear, .matmul: return true; default: return false }
            default: return false
            }
        }
        func profiled(_ plan: Int8Plan) throws -> (report: String, conv: Double, products: Double, reformat: Double) {
            plan.profile = true
            defer { plan.profile = false }
            for _ in 0..<50 { _ = try plan.run([x]) }
            func ms(_ include: (PlanStep) -> Bool) -> Double { 1000 * zip(plan.steps, plan.stepMedians).filter { include($0.0) }.reduce(0) { $0 + $1.1 } }
            return (plan.profileReport(top: 6), ms(isConv), ms(isProduct), ms { plan.reformatKind(of: $0) != nil })
        }
        let pf = try profiled(fp32Plan), pq = try profiled(int8Plan)
        (r.profileFP32, r.profileINT8) = (pf.report, pq.report)
        (r.convMsFP32, r.convMsINT8, r.productsMsFP32, r.productsMsINT8, r.reformatMs) = (pf.conv, pq.conv, pf.products, pq.products, pq.reformat)
        r.engineINT8mAP = try evaluateRTDETR(student, on: val, progressLabel: "ACT through the INT8 plan") { images in
            let out = try int8Plan.runBatch(images)
            return (out[0], out[1])
        }.0.mAP
        sim.remove()

        // MARK: - 7 Verdicts and report
        r.verdicts = exp07Verdicts(r)
        r.claims = exp07Claims(r)
        var provenance = Provenance.current()
        provenance.seeds = ["model": plan.seed, "calibration images": calibration.seed, "ACT data order": act.seed]
        provenance.config = ["quick": String(quick), "ACT iterations": String(act.iterations), "ACT lr": String(act.learningRate),
                             "isa": "\(Kernels.isa)", "threads": String(Kernels.threads)]
        provenance.wallSeconds = Date().timeIntervalSince(start)
        r.provenance = provenance.summary
        let report = Exp07Report(results: r, quick: quick, kernels: Kernels.summary, provenance: provenance, analysisTable: analysisTable)
        let url = try writeResults(name: "exp07", quick: quick, markdown: report.markdown, results: r)
        print(r.verdicts.all.joined(separator: "\n"))
        print("wrote \(url.path)")
    }
}

lineBufferStandardOutput() // progress and results reach a log file as they happen
Exp07.main()
