// exp08 — The article's methods stacked in one table, every claim in one place, and
// latency-aware partial quantization.
//
// Claim (CLAIMS.md A11): the YOLOv6 article closes with a table (its Table 10, image lost)
// stacking its methods: PTQ 35.0 -> RepOpt PTQ 40.9 -> partial PTQ 42.0 -> partial QAT + CWD
// about 42.1 / 42.3, and for speed +40% from INT8, x2.14 from moving preprocessing off the CPU.
//
// This experiment trains nothing. It reads the `claims` and numbers the other experiments wrote
// to results/*.json (a missing or unreadable file is named, with the command that writes it),
// and writes:
//   1. every claim, A1-A11 and B1-B4, as one row: the paper's number, ours, the outcome;
//   2. the stack: each method's mAP (from the experiment that measured it) beside its INT8
//      engine's speed at batch 1 and 32 and exp06's serving throughput;
//   3. beyond the article — latency-aware partial quantization. The article leaves layers in
//      FP32 by accuracy alone; a deployer pays latency, including the Reformat steps each FP32
//      island adds at its borders. For k = 0..K layers left in FP32, chosen (a) by exp03's
//      sensitivity ranking (the mAP method) and (b) greedily by the mAP a layer recovers per
//      millisecond its island costs (re-measured on the engine for every candidate, with the
//      islands already chosen), each configuration is built, timed and scored on val; the
//      Pareto front of mAP against latency is marked (results/exp08/pareto.svg);
//   4. README.md's results index (between its `results-index` markers), from the same claims.
//
// `--tables-only` (what `make results` runs) skips the study's measurements and reuses the last
// study in results/exp08.json, so the tables and the README index can be regenerated from the
// committed JSON on any machine, with no trained model.
//
// Files: main.swift (the pipeline), Results.swift (what is read and measured, the A11
// verdict), Report.swift (results/exp08.md and the figure).
//
// Run: `make exp08` (about 3 minutes on 2 AVX2 cores once exp00-exp07 have run; the study
// measures ~100 engine plans and scores ~17 on val), `make results` (seconds), `make exp08
// QUICK=1` (reads results/quick/, tiny model).
import ArgumentParser
import Foundation
import QuantLab

struct Exp08: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "exp08_summary",
                                                    abstract: "Every claim in one table, the article's stack of methods, and latency-aware partial quantization.")

    @Flag(help: "Read results/quick/, tiny model; the README is left alone.") var quick = false
    @Flag(help: "Only the tables and the README index from the results JSON; the study is taken from the last results/exp08.json.") var tablesOnly = false
    @Option(help: "Layers left in FP32 at most (k = 0..K; default 8, 6 with --quick).") var maxFP32Layers: Int?
    @Option(help: "Candidates of the latency-aware greedy: the top M of the sensitivity ranking (default 16, 8 with --quick).") var candidates: Int?
    @Option(help: "Profiled batch-1 runs per candidate plan of the greedy (default 15, 5 with --quick).") var profileRuns: Int?
    @Option(help: "Timed batch-1 runs per configuration (default 40, 10 with --quick).") var runs: Int?
    @Option(help: "Where the results files are.") var resultsRoot = "results"
    @Option(help: "The README whose results index is regenerated (not with --quick).") var readme = "README.md"
    @Option(help: "Where datasets live.") var dataRoot = "data"
    @Option(help: "Where trained baselines are cached.") var modelsRoot = "data/models"

    func validate() throws {
        if let k = maxFP32Layers, !(1...64).contains(k) { throw ValidationError("--max-fp32-layers must be in 1...64, got \(k)") }
        if let m = candidates, !(1...256).contains(m) { throw ValidationError("--candidates must be in 1...256, got \(m)") }
        if let r = profileRuns, !(1...10_000).contains(r) { throw ValidationError("--profile-runs must be in 1...10000, got \(r)") }
        if let r = runs, !(3...100_000).contains(r) { throw ValidationError("--runs must be in 3...100000, got \(r)") }
    }

    func run() throws {
        let start = Date()
        let root = URL(fileURLWithPath: resultsRoot)
        let dir = resultsDirectory(quick: quick, root: root)
        var results = Exp08Results()

        // MARK: - 1 Read every experiment's claims
        let index = loadResultsIndex(directory: dir, experiments: ExperimentEntry.measured)
        results.problems = index.compactMap { e in e.problem.map { "\(e.experiment.name): \($0)" } }
        for p in results.problems { print("note: \(p)") }

        // The numbers the stack needs, from the experiments that measured them.
        func read<T: Decodable>(_ type: T.Type, _ name: String) -> T? {
            let url = dir.appendingPathComponent("\(name).json")
            guard let data = try? Data(contentsOf: url) else { return nil } // named above as missing
            do { return try JSONDecoder().decode(T.self, from: data) } catch {
                let why = "\(name): \(url.path) lacks what the stack needs (\(error)): rerun `make \(name)`"
                if !results.problems.contains(where: { $0.hasPrefix("\(name):") }) { results.problems.append(why); print("note: \(why)") }
                return nil
            }
        }
        let e02 = read(Exp02Numbers.self, "exp02"), e03 = read(Exp03Numbers.self, "exp03")
        let e04 = read(Exp04Numbers.self, "exp04"), e06 = read(Exp06Numbers.self, "exp06")

        // MARK: - 2 The study: latency-aware partial quantization on the engine
        let kMax = maxFP32Layers ?? (quick ? 6 : 8)
        if tablesOnly {
            let previous = try? JSONDecoder().decode(Exp08Results.self, from: Data(contentsOf: dir.appendingPathComponent("exp08.json")))
            results.study = previous?.study
            if results.study == nil { results.problems.append("exp08: no study in \(dir.path)/exp08.json yet: run `make exp08\(quick ? " QUICK=1" : "")`") }
        } else if let e03 {
            results.study = try LatencyStudy(quick: quick, kMax: kMax, candidates: candidates ?? (quick ? 8 : 16), profileRuns: profileRuns ?? (quick ? 5 : 15),
                                             runs: runs ?? (quick ? 10 : 40), dataRoot: dataRoot, modelsRoot: modelsRoot).run(sensitivity: e03.sensitivity)
        } else {
            results.problems.append("exp08: the study needs exp03's sensitivity ranking: run `make exp03\(quick ? " QUICK=1" : "")`")
        }

        // MARK: - 3 The stack (A11)
        let study = results.study
        let topK = Int(Paper.A4.skippedLayers.value)
        let int8 = study?.point("sensitivity", k: 0), partial = study?.point("sensitivity", k: topK), fp32Graph = study?.fp32Graph
        let primary = e02?.primaryCalibrator ?? "entropy"
        func seeds(_ b: BlockKind) -> String { "exp02, \(primary), mean of \(e02?.seeds(b) ?? 0) seeds" }
        let skippedNote = e04.map { Set($0.skipped) == Set(partial?.fp32Layers ?? []) ? "" : " (exp04 left other layers in FP32: \($0.skipped.joined(separator: ", ")))" } ?? ""
        results.stack = [
            .init(method: "FP32 (RepOpt)", paper: Paper.A3.yolov6sFP32.text, mAP: e03?.fp32mAP, source: "exp03", engine: "FP32 graph",
                  imagesPerSecondBatch1: fp32Graph.map { 1000 / $0.latencyMs }, imagesPerSecondBatch32: fp32Graph?.imagesPerSecondBatch32,
                  servingBaseline: e06?.imagesPerSecond(engine: "FP32", fused: false), servingFused: e06?.imagesPerSecond(engine: "FP32", fused: true)),
            .init(method: "PTQ (RepVGG)", paper: Paper.A3.repvggPTQ.text, mAP: e02?.ptq(.repvgg), source: seeds(.repvgg), engine: "INT8, every layer (same deploy graph as RepOpt's)",
                  imagesPerSecondBatch1: int8.map { 1000 / $0.latencyMs }, imagesPerSecondBatch32: int8?.imagesPerSecondBatch32),
            .init(method: "RepOpt PTQ", paper: Paper.A3.repoptPTQ.text, mAP: e02?.ptq(.repopt), source: seeds(.repopt), engine: "INT8, every layer",
                  imagesPerSecondBatch1: int8.map { 1000 / $0.latencyMs }, imagesPerSecondBatch32: int8?.imagesPerSecondBatch32,
                  servingBaseline: e06?.imagesPerSecond(engine: "INT8", fused: false), servingFused: e06?.imagesPerSecond(engine: "INT8", fused: true)),
            .init(method: "partial PTQ (top \(topK) in FP32)", paper: Paper.A4.partialPTQ.text, mAP: e03?.partialPTQ[SensitivityMetric.map.rawValue]?[String(topK)],
                  source: "exp03, mAP-method ranking, seed 0", engine: "INT8, \(topK) FP32 islands",
                  imagesPerSecondBatch1: partial.map { 1000 / $0.latencyMs }, imagesPerSecondBatch32: partial?.imagesPerSecondBatch32),
            .init(method: "partial QAT", paper: "~" + Paper.A5.partialQAT.text, mAP: e04?.final("partial_qat")?.mean,
                  source: "exp04, mean of \(e04?.final("partial_qat")?.seeds ?? 0) seeds" + skippedNote, engine: "INT8, \(topK) FP32 islands",
                  imagesPerSecondBatch1: partial.map { 1000 / $0.latencyMs }, imagesPerSecondBatch32: partial?.imagesPerSecondBatch32),
            .init(method: "partial QAT + CWD", paper: "~" + Paper.A5.partialQATCWD.text, mAP: e04?.final("partial_qat_cwd")?.mean,
                  source: "exp04, mean of \(e04?.final("partial_qat_cwd")?.seeds ?? 0) seeds" + skippedNote, engine: "INT8, \(topK) FP32 islands",
                  imagesPerSecondBatch1: partial.map { 1000 / $0.latencyMs }, imagesPerSecondBatch32: partial?.imagesPerSecondBatch32),
        ]
        // The article's steps, each in its own unit (mAP points there, mAP x 100 here; speed ratios - 1).
        func delta(_ a: Double?, _ b: Double?, scale: Double = 100) -> Double { (a != nil && b != nil) ? scale * (b! - a!) : .nan }
        let m = results.stack.map(\.mAP)
        let servingINT8 = (e06?.imagesPerSecond(engine: "INT8", fused: false), e06?.imagesPerSecond(engine: "INT8", fused: true))
        let steps = [
            StackStep(name: "RepVGG PTQ → RepOpt PTQ", paper: Paper.A3.repoptPTQ.value - Paper.A3.repvggPTQ.value, ours: delta(m[1], m[2]), noise: 0.5),
            StackStep(name: "→ partial PTQ", paper: Paper.A4.partialPTQ.value - Paper.A3.repoptPTQ.value, ours: delta(m[2], m[3]), noise: 0.5),
            StackStep(name: "→ partial QAT + CWD", paper: Paper.A5.partialQATCWD.value - Paper.A4.partialPTQ.value, ours: delta(m[3], m[5]), noise: 0.5),
            StackStep(name: "INT8 engine speed", paper: Paper.A9.int8OverFP16.value / 100,
                      ours: int8.flatMap { i in fp32Graph.map { $0.latencyMs / i.latencyMs - 1 } } ?? .nan, noise: 0.05),
            StackStep(name: "preprocessing (serving)", paper: Paper.A10.daliSpeedup.value - 1,
                      ours: servingINT8.0.flatMap { b in servingINT8.1.map { $0 / b - 1 } } ?? .nan, noise: 0.05),
        ]
        let paperStack = "PTQ \(Paper.A3.repvggPTQ.text) → RepOpt PTQ \(Paper.A3.repoptPTQ.text) → partial PTQ \(Paper.A4.partialPTQ.text) → partial QAT + CWD ~\(Paper.A5.partialQATCWD.text); INT8 +\(Paper.A9.int8OverFP16.text)%, preprocessing ×\(Paper.A10.daliSpeedup.text)"
        results.claims = [exp08Claim(steps, paper: paperStack, quick: quick)]

        // MARK: - 4 Report: results/exp08.md, the figure, README's index
        var provenance = Provenance.current()
        provenance.config = ["quick": String(quick), "tables only": String(tablesOnly), "results": dir.path, "max FP32 layers": String(kMax)]
        provenance.wallSeconds = Date().timeIntervalSince(start)
        results.provenance = provenance.summary
        let summaryEntry = IndexEntry(experiment: ExperimentEntry.summary, status: .found(claims: results.claims, provenance: results.provenance))
        let report = Exp08Report(results: results, index: index, steps: steps, quick: quick, provenance: provenance)
        try report.writeFigure(directory: dir)
        let path = try writeResults(name: "exp08", quick: quick, markdown: report.markdown, results: results, root: root)
        if !quick {
            let url = URL(fileURLWithPath: readme)
            let text = try String(contentsOf: url, encoding: .utf8)
            let updated = try replacingMarkedSection(of: text, begin: readmeBegin, end: readmeEnd, with: experimentIndexTable(index + [summaryEntry]))
            if updated != text { try AtomicFile.write(Data(updated.utf8), to: url) }
            print("README index: \(updated == text ? "unchanged" : "regenerated") (\(readme))")
        }
        print("\n\(results.claims[0].verdict)\nwrote \(path.path)")
    }
}

/// The lines around README.md's generated results index.
let readmeBegin = "<!-- results-index:begin (generated by `make results` from results/*.json; do not edit) -->"
let readmeEnd = "<!-- results-index:end -->"

/// Latency-aware partial quantization: FP32 islands chosen by sensitivity or by mAP per
/// millisecond, each configuration measured on the INT8 engine.
struct LatencyStudy {
    var quick: Bool
    var kMax: Int
    var candidates: Int
    var profileRuns: Int
    var runs: Int
    var dataRoot: String
    var modelsRoot: String

    func run(sensitivity: SensitivityReport) throws -> Exp08Results.Study {
        let start = Date()
        let plan = Baselines.Plan(quick: quick, dataRoot: URL(fileURLWithPath: dataRoot), modelsRoot: URL(fileURLWithPath: modelsRoot))
        let (train, _) = try Baselines.detectionData(plan: plan)
        // exp03's model and calibration, so that its ranking applies: loaded, never trained here.
        let (model, _, val) = try Baselines.detector(.repopt, plan: plan, trainIfMissing: false)
        let calibration = CalibrationPlan(batches: 4, batchSize: 32, seed: 0), method = CalibrationMethod.entropy
        let calibrationText = "\(method), \(calibration.batches) x \(calibration.batchSize), seed \(calibration.seed)"
        guard sensitivity.calibration == calibrationText, sensitivity.model == "det-repopt\(quick ? "-quick" : "")" else {
            throw ReportError("exp03's sensitivity is of \(sensitivity.model) calibrated '\(sensitivity.calibration)'; the study needs det-repopt calibrated '\(calibrationText)': rerun `make exp03`")
        }
        let sim = try prepareDetectorPTQ(model, train: train, method: method, calibration: calibration)
        defer { sim.remove() }
        let size = model.config.inputSize
        var rng = SeededGenerator(seed: 0x8008)
        let x1 = Tensor.uniform([1, 3, size, size], low: 0, high: 1, rng: &rng)
        let x32 = Tensor.uniform([32, 3, size, size], low: 0, high: 1, rng: &rng)

        func plans(fp32 layers: [String], batch: Int) throws -> Int8Plan {
            try sim.setEnabled(true)
            try sim.setEnabled(false, layers: layers)
            defer { try? sim.setEnabled(true) }
            return try Int8Plan(try Graph.trace(model, batch: batch))
        }
        /// A plan's batch-1 time as the sum of its steps' medians over profiled runs (steady
        /// against a run the OS interrupts); what the greedy compares.
        func profiledMs(_ p: Int8Plan) throws -> Double {
            for _ in 0..<2 { _ = try p.run([x1]) }
            p.profile = true
            for _ in 0..<profileRuns { _ = try p.run([x1]) }
            defer { p.profile = false }
            return 1000 * p.stepMedians.reduce(0, +)
        }

        // (a) the article's choice: the top k of the sensitivity ranking (mAP method).
        let ranking = sensitivity.ranking(by: .map)
        let gains = Dictionary(uniqueKeysWithValues: sensitivity.layers.map { ($0.name, SensitivityMetric.map.sensitivity($0, fp32mAP: sensitivity.fp32mAP) ?? 0) })
        var configurations: [(ranking: String, k: Int, layers: [String])] = (0...min(kMax, ranking.count)).map { ("sensitivity", $0, Array(ranking.prefix($0))) }

        // (b) latency-aware greedy over the top `candidates` layers: at each step, each remaining
        // candidate's island is built with those already chosen and timed; a candidate that
        // recovers mAP at no measured cost is taken first (largest gain), otherwise the largest
        // gain per millisecond. Gains are the mAP method's per-layer drops (exp03).
        var chosen: [String] = [], steps: [Exp08Results.GreedyStep] = []
        var current = try profiledMs(try plans(fp32: [], batch: 1))
        let pool = Array(ranking.prefix(candidates))
        while chosen.count < min(kMax, pool.count) {
            var measured: [(layer: String, gain: Double, ms: Double)] = []
            for c in pool where !chosen.contains(c) {
                measured.append((c, gains[c] ?? 0, try profiledMs(try plans(fp32: chosen + [c], batch: 1))))
            }
            let useful = measured.filter { $0.gain > 0 }
            guard !useful.isEmpty else { break }
            let free = useful.filter { $0.ms <= current }
            let pick = free.max { $0.gain < $1.gain } ?? useful.max { $0.gain / ($0.ms - current) < $1.gain / ($1.ms - current) }!
            steps.append(.init(layer: pick.layer, gain: pick.gain, costMs: pick.ms - current))
            chosen.append(pick.layer)
            current = pick.ms
            print(String(format: "greedy k=%d: %@ (gain %.4f, cost %+.3f ms)", chosen.count, pick.layer, pick.gain, steps.last!.costMs))
        }
        configurations += (0...chosen.count).map { ("latency-aware", $0, Array(chosen.prefix($0))) }

        // Every distinct configuration built once, then all timed together, run by run in turn
        // (timeInterleaved), and scored on val with its batch-32 plan.
        var unique: [[String]] = []
        for c in configurations where !unique.contains(where: { Set($0) == Set(c.layers) }) { unique.append(c.layers) }
        let floatGraph = try Graph.trace(model, batch: 1).withoutQuantizers()
        let plan1s = try unique.map { try plans(fp32: $0, batch: 1) } + [try Int8Plan(floatGraph)]
        let plan32s = try unique.map { try plans(fp32: $0, batch: 32) } + [try Int8Plan(try Graph.trace(model, batch: 32).withoutQuantizers())]
        let speed1 = try timeInterleaved(plan1s, input: x1, runs: runs)
        let speed32 = try timeInterleaved(plan32s, input: x32, runs: max(3, runs / 10))
        var mAPs: [Double] = []
        for (i, p) in plan32s.enumerated() {
            let label = i < unique.count ? "val, \(unique[i].count) layers in FP32" : "val, FP32 graph"
            mAPs.append(try evaluateDetector(p, model: model, on: val, progressLabel: label))
        }
        func point(_ ranking: String, _ k: Int, _ layers: [String]) -> Exp08Results.Point {
            let i = layers.isEmpty && ranking == Exp08Results.Study.fp32GraphName ? unique.count : unique.firstIndex { Set($0) == Set(layers) }!
            return .init(ranking: ranking, k: k, fp32Layers: layers, latencyMs: 1000 * speed1[i].medianSeconds, imagesPerSecondBatch32: speed32[i].imagesPerSecond,
                         mAP: mAPs[i], reformatSteps: plan1s[i].reformatCount)
        }
        var points = configurations.map { point($0.ranking, $0.k, $0.layers) }
        points.append(point(Exp08Results.Study.fp32GraphName, sensitivity.allLayers.count, []))
        for i in Statistics.paretoFront(cost: points.map(\.latencyMs), value: points.map(\.mAP)) { points[i].pareto = true }
        var provenance = Provenance.current()
        provenance.wallSeconds = Date().timeIntervalSince(start)
        return Exp08Results.Study(model: sensitivity.model, calibration: calibrationText, candidates: pool.count, points: points, greedy: steps,
                                  timingNoise: speed1.map(\.drift).max() ?? .nan, kernels: Kernels.summary,
                                  seconds: Date().timeIntervalSince(start), provenance: provenance.summary)
    }
}

lineBufferStandardOutput() // progress and results reach a log file as they happen
Exp08.main()
