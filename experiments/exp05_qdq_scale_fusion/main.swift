// exp05 — Q/DQ graph scale fusion: why YOLOv6's QAT graph ran slower than PTQ, and the fix.
//
// Claims (CLAIMS.md A6-A8): in TensorRT the explicit Q/DQ graph of YOLOv6s QAT ran slower than
// implicit PTQ: where one tensor is read by quantizers of different scales the producer cannot
// write INT8 once, so it writes FP32 and every branch quantizes it again (10.8% of kernels were
// such reformats; the article's case: `neck.reduce_layer1.conv` feeds the upsampling transposed
// conv at scale 0.083 and, through a concat, `Rep_n3.conv1` at 0.105). Giving every quantizer
// of one tensor (and every input of a concat) the group's max amax removed them: QAT 528 QPS vs
// PTQ 556, mAP 42.1 kept.
//
// What we expect: on our engine, which follows the same rules (ARCHITECTURE.md, Int8Plan), the
// explicit placement gives Reformat steps exactly where the article found them; unification
// removes them and recovers implicit PTQ's speed; mAP moves by less than the noise, because
// merged amaxes are of one order of magnitude.
//
// Protocol: the RepOpt detector of exp00 (the article's model), deploy form, entropy
// calibration on 4 x 32 training images. Three ways to quantize it, all run by the INT8 engine:
//   (a) implicit PTQ: one scale per group of quantizers that must share one (a tensor and the
//       concats it flows through), calibrated on everything the group reads together;
//   (b) explicit Q/DQ as YOLOv6's QAT places them: a quantizer at every conv and transposed-conv
//       input, each with its own calibrated amax (we have no QAT model yet, issue #13: the amaxes
//       are PTQ-calibrated, which is also what YOLOv6's QAT starts from and keeps frozen);
//   (c) (b) after the scale-unification pass (groups from the graph, amax = group max).
// Per way: Reformat steps by kind, their share of the plan's time (per-step medians over many
// batch-1 runs) and of its steps, img/s at batch 1 and 32, val mAP on the engine. Then the
// article's rule of thumb: for each group, max/min amax against the mAP change of merging that
// group alone.
//
// Files: main.swift (the pipeline), Results.swift (what is measured, the verdicts), Report.swift
// (results/exp05.md).
//
// Run: `make exp05` (80 s on 2 AVX2 cores once the RepOpt baseline exists; training it first
// takes ~40 min), `make exp05 QUICK=1` (tiny model, ~15 s).
import ArgumentParser
import Foundation
import QuantLab

struct Exp05: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "exp05_qdq_scale_fusion",
                                                    abstract: "Q/DQ scale fusion: implicit PTQ vs explicit Q/DQ vs explicit with unified scales, on the INT8 engine.")

    @Flag(help: "Tiny model and data, results to results/quick/.") var quick = false
    @Option(help: "Detector block: repvgg, qarepvgg or repopt.") var block = "repopt"
    @Option(help: "Calibrator for activations.") var method = "entropy"
    @Option(help: "Timed batch-1 runs per way (latency and per-step profile; default 200, 50 with --quick).") var runs: Int?
    @Option(help: "Timed batch-32 runs per way (default 30, 3 with --quick).") var batchRuns: Int?
    @Option(help: "Seed for the calibration images and the timing input.") var seed: UInt64 = 0
    @Option(help: "Where datasets live.") var dataRoot = "data"
    @Option(help: "Where trained baselines are cached.") var modelsRoot = "data/models"

    func validate() throws {
        guard let b = BlockKind(rawValue: block), b != .repoptSearch else { throw ValidationError("--block must be repvgg, qarepvgg or repopt, got '\(block)'") }
        do { _ = try CalibrationMethod(parsing: method) } catch { throw ValidationError("--method: \(error)") }
        if let r = runs, !(5...100_000).contains(r) { throw ValidationError("--runs must be in 5...100000, got \(r)") }
        if let r = batchRuns, !(1...10_000).contains(r) { throw ValidationError("--batch-runs must be in 1...10000, got \(r)") }
    }

    func run() throws {
        let start = Date()
        let plan = Baselines.Plan(quick: quick, dataRoot: URL(fileURLWithPath: dataRoot), modelsRoot: URL(fileURLWithPath: modelsRoot))
        let calibrationMethod = try CalibrationMethod(parsing: method)
        let timing = Timing(runs: runs ?? (quick ? 50 : 200), batchRuns: batchRuns ?? (quick ? 3 : 30), seed: seed)

        // MARK: - 1 Data, 2 Model, 3 Train or load
        let (train, _) = try Baselines.detectionData(plan: plan)
        let (model, _, val) = try Baselines.detector(BlockKind(rawValue: block)!, plan: plan)
        let fp32 = try evaluateDetector(model, on: val, progressLabel: "FP32 val").0.mAP

        // MARK: - 4 Quantize: (b) the explicit placement, calibrated
        // Deploy form; a quantizer at every conv / transposed-conv input (per tensor) and weight
        // (per channel); each activation quantizer calibrated on what it reads alone.
        let sim = try prepareDetectorPTQ(model, train: train, method: calibrationMethod, calibration: CalibrationPlan(batches: 4, batchSize: 32, seed: seed))
        defer { sim.remove() }
        let explicit = sim.layers.map(\.input.amax)
        func restoreExplicit() { for (l, a) in zip(sim.layers, explicit) { l.input.amax = a } }
        let simulatedExplicit = try evaluateDetector(model, on: val, progressLabel: "simulator, explicit").0.mAP

        // The groups: quantizers that read one tensor, directly or through max pools and concats
        // (union-find over the traced graph, ScaleUnification.swift).
        let groups = scaleGroups(try Graph.trace(model, batch: 1))
        let amaxByName = Dictionary(uniqueKeysWithValues: sim.layers.compactMap { l in l.input.amax.map { ("\(l.name).input", $0[0]) } })

        // MARK: - 5 Evaluate each way on the engine
        // Each way's plans are compiled from the quantizers as they stand (a plan keeps its
        // scales), scored and profiled; then all are timed together, run by run in turn, so
        // that a change in the machine's state hits every way alike.
        var results = Exp05Results(fp32mAP: fp32, simulatorExplicitmAP: simulatedExplicit)
        print("(b) explicit Q/DQ")
        let explicitWay = try timing.compile(model, val: val, label: "explicit")
        print("(c) explicit, scales unified")
        let unified = try unifyScales(sim, groups: groups)
        let unifiedWay = try timing.compile(model, val: val, label: "unified")
        print("(a) implicit PTQ")
        restoreExplicit()
        let joint = try calibrateJointly(sim, groups: groups, method: calibrationMethod)
        let implicitWay = try timing.compile(model, val: val, label: "implicit")
        let float = try Int8Plan(try Graph.trace(model, batch: 1).withoutQuantizers())
        let speeds = try timing.interleaved([implicitWay.plan1, explicitWay.plan1, unifiedWay.plan1, float], batch: 1, size: model.config.inputSize)
        let speeds32 = try timing.interleaved([implicitWay.plan32, explicitWay.plan32, unifiedWay.plan32], batch: 32, size: model.config.inputSize)
        var ways = [implicitWay, explicitWay, unifiedWay]
        for i in ways.indices {
            ways[i].result.imagesPerSecondBatch1 = speeds[i].imagesPerSecond
            ways[i].result.imagesPerSecondBatch32 = speeds32[i].imagesPerSecond
        }
        (results.implicit, results.explicit, results.unified) = (ways[0].result, ways[1].result, ways[2].result)
        results.fp32Graph = .init(imagesPerSecondBatch1: speeds[3].imagesPerSecond)
        // the verdicts compare batch-1 speeds: their noise is the batch-1 plans' drift (200 runs; 10 batch-32 runs give no stable halves)
        results.timingNoise = speeds.map(\.drift).max() ?? .nan
        for (name, w) in zip(["implicit", "explicit", "unified"], ways.map(\.result)) {
            print(String(format: "  %@: %d Reformat steps (%.1f%% of time), %.1f img/s at batch 1, %.1f at batch 32, mAP %.4f",
                         name, w.reformatSteps, 100 * w.reformatTimeShare, w.imagesPerSecondBatch1, w.imagesPerSecondBatch32, w.mAP))
        }

        // The groups, with their amaxes under each way, and YOLOv6's hand-written list beside them.
        results.groups = zip(unified, joint).map { u, j in
            .init(members: u.names, explicitAmax: u.before, unifiedAmax: u.after, implicitAmax: j.after)
        }
        results.yolov6List = YOLOv6FusionList.compare(with: groups).map { .init(yolov6: $0.group.yolov6, ours: $0.group.ours, status: $0.status) }
        results.unlisted = YOLOv6FusionList.unlisted(groups)
        results.articleCase = Paper.A7.readers.map { amaxByName[$0] ?? .nan }

        // The rule of thumb: each group merged alone, from (b); mAP change against max/min amax.
        for (i, g) in results.groups.enumerated() where g.spread > 1 {
            restoreExplicit()
            try unifyScales(sim, groups: [g.members])
            let plan32 = try Int8Plan(try Graph.trace(model, batch: 32))
            results.groups[i].mergedAlonemAP = try evaluateDetector(plan32, model: model, on: val, progressLabel: "merge \(g.members[0]) alone")
        }
        restoreExplicit()

        // MARK: - 6 Report
        (results.verdicts, results.claims) = exp05Verdicts(results, quick: quick)
        var provenance = Provenance.current()
        provenance.seeds = ["calibration images, timing input": seed]
        provenance.config = ["quick": String(quick), "block": block, "calibrator": calibrationMethod.description, "batch-1 runs": String(timing.runs),
                             "batch-32 runs": String(timing.batchRuns), "dataset": plan.detectionPreset.name, "isa": "\(Kernels.isa)", "threads": String(Kernels.threads)]
        provenance.wallSeconds = Date().timeIntervalSince(start)
        results.provenance = provenance.summary
        let report = Exp05Report(results: results, block: block, calibrationMethod: calibrationMethod, valImages: val.count, quick: quick,
                                 timing: timing, kernels: Kernels.summary, provenance: provenance)
        let path = try writeResults(name: "exp05", quick: quick, markdown: report.markdown, results: results)
        for v in results.verdicts.all { print(v) }
        print("wrote \(path.path)")
    }
}

/// How each way is timed and scored on the engine.
struct Timing {
    var runs: Int
    var batchRuns: Int
    var seed: UInt64

    private func input(_ batch: Int, size: Int) -> Tensor {
        var rng = SeededGenerator(seed: seed &+ 0x7135)
        return Tensor.uniform([batch, 3, size, size], low: 0, high: 1, rng: &rng)
    }

    /// One way, compiled: its batch-1 and batch-32 plans and what is measured of it alone.
    struct CompiledWay {
        var plan1: Int8Plan
        var plan32: Int8Plan
        var result: Exp05Results.Way
    }

    /// The model as its quantizers now stand: the batch-1 plan profiled (per-step medians), the
    /// batch-32 plan scored on val. Speeds are filled in by `interleaved`.
    func compile(_ model: YOLOv6, val: DetectionDataset, label: String) throws -> CompiledWay {
        let size = model.config.inputSize
        let plan1 = try Int8Plan(try Graph.trace(model, batch: 1))
        let x1 = input(1, size: size)
        for _ in 0..<3 { _ = try plan1.run([x1]) }
        plan1.profile = true
        for _ in 0..<runs { _ = try plan1.run([x1]) }
        let share = plan1.reformatShare
        plan1.profile = false
        let plan32 = try Int8Plan(try Graph.trace(model, batch: 32))
        let mAP = try evaluateDetector(plan32, model: model, on: val, progressLabel: "engine, \(label)")
        let result = Exp05Results.Way(reformats: plan1.reformats, reformatSteps: plan1.reformatCount, steps: plan1.steps.count, int8Convs: plan1.int8ConvCount,
                                      reformatTimeShare: share.time, reformatCountShare: share.count,
                                      imagesPerSecondBatch1: .nan, imagesPerSecondBatch32: .nan, mAP: mAP, neckPlan: neckLines(plan1.explain()))
        return CompiledWay(plan1: plan1, plan32: plan32, result: result)
    }

    /// Speed of each plan, timed in turn run by run (after 3 warm-up runs each): img/s from the
    /// median, and the drift of the two halves' medians as the timing noise.
    func interleaved(_ plans: [Int8Plan], batch: Int, size: Int) throws -> [PlanSpeed] {
        try timeInterleaved(plans, input: input(batch, size: size), runs: batch == 1 ? runs : batchRuns)
    }

    /// The lines of a plan's explanation from the first neck step to the last, and its summary.
    private func neckLines(_ explain: String) -> [String] {
        let lines = explain.split(separator: "\n").map(String.init)
        guard let first = lines.firstIndex(where: { $0.contains(" neck.") }), let last = lines.lastIndex(where: { $0.contains(" neck.") }) else { return [] }
        return Array(lines[first...last]) + [lines.last!]
    }
}

lineBufferStandardOutput() // progress and results reach a log file as they happen
Exp05.main()
