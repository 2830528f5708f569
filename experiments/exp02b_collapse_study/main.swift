// exp02b — When does RepVGG lose more than RepOpt under PTQ? A controlled study.
//
// Claims (CLAIMS.md): A1 plain TensorRT PTQ of a re-parameterised network collapses
// (RepVGG-B1 78.42 -> 54.55 top-1); A3 RepOpt survives it. exp02 does not reproduce either on
// our models (RepOpt even loses more on the detector), and exp01 shows the mechanism only in
// part. This experiment asks which of the factors the literature ties to the collapse moves
// RepVGG's PTQ drop against RepOpt's here:
//   - weight granularity: per output channel (TensorRT's default, exp02's protocol) vs one
//     scale per tensor — a RepVGG block's fused kernel adds branches whose BN scales differ
//     from channel to channel, so one scale per tensor should hurt it most;
//   - training length and width (RepVGG-B1 is far wider and trained far longer than ours);
//   - weight decay: ours (1e-4) and YOLOv6's 5e-4 (none only in the QUICK grid: the full grid
//     fits an hour on 2 cores without it), and RepVGG's custom L2 on the equivalent kernel
//     (RepVGGRegularization.swift);
//   - and, measured on every model before fusion, the identity branch's BN scale (max over
//     channels of gamma / sqrt(var + eps)), its share of the fused centre tap, and the fused
//     kernels' channel-range spread, set against the PTQ drop.
//
// Protocol: classifiers (cheap) over a one-factor-at-a-time grid around the baseline recipe —
// the base point is exp00's cached classifiers; each variant is trained once and cached with
// its recipe in data/models/study/. RepVGG and RepOpt at every point (QARepVGG at the base).
// PTQ as exp02: deploy form, INT8 symmetric, activations per tensor, calibrators entropy
// (primary) and max (detectors: entropy only) on 4 x 32 training images, 3 calibration seeds
// (1 with --quick); weights per channel and per tensor. The detectors of exp02 get the granularity arm and the block statistics (their
// training costs too much for a grid here).
//
// The grid shards across machines: `--shard i/n` trains and measures the models with
// index % n == i and writes results/exp02b/shard-i-of-n.json; `--merge` joins every shard
// file there (they must describe the same grid and calibration) into results/exp02b.md.
//
// Files: main.swift (the pipeline), Results.swift (what is measured, the analysis, the
// verdict), Report.swift (results/exp02b.md).
//
// Run: `make exp02b` (about 1.5 hours on 2 AVX2 cores when nothing is cached: its 13
// classifiers train for ~85 minutes, the base three are exp00's; about 10 minutes of PTQ once
// they are cached; `--shard i/n` on n machines, then `--merge`, divides the training),
// `make exp02b QUICK=1` (tiny models, 1 calibration seed, a few minutes; results/quick/).
import ArgumentParser
import Foundation
import QuantLab

struct Exp02b: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "exp02b_collapse_study",
                                                    abstract: "Under which conditions does RepVGG lose more than RepOpt under PTQ? Width, training length, weight decay and weight granularity.")

    @Flag(help: "Tiny models and data, results to results/quick/.") var quick = false
    @Option(help: "Only the models i of n (i/n, 0-based); writes a shard file to merge.") var shard: String?
    @Flag(help: "Merge the shard files in <results>/exp02b/ into the report; measures nothing.") var merge = false
    @Option(help: "Calibration seeds (which training images are drawn; default 3, 1 with --quick).") var seedCount: Int?
    @Flag(help: "Skip the detector arm.") var skipDetectors = false
    @Option(help: "Where the results files go.") var resultsRoot = "results"
    @Option(help: "Where datasets live.") var dataRoot = "data"
    @Option(help: "Where trained baselines are cached.") var modelsRoot = "data/models"

    static let methods: [CalibrationMethod] = [.entropy, .max]
    static let primary = CalibrationMethod.entropy
    static let calibration = CalibrationPlan(batches: 4, batchSize: 32)

    func validate() throws {
        if let n = seedCount, !(1...10).contains(n) { throw ValidationError("--seed-count must be in 1...10, got \(n)") }
        if let s = shard { do { _ = try Shard(parsing: s) } catch { throw ValidationError("--shard: \(error)") } }
        if merge && shard != nil { throw ValidationError("--merge joins shard files; it does not take --shard") }
    }

    var seeds: Int { seedCount ?? (quick ? 1 : 3) }
    var plan: Baselines.Plan { Baselines.Plan(quick: quick, dataRoot: URL(fileURLWithPath: dataRoot), modelsRoot: URL(fileURLWithPath: modelsRoot)) }
    var grid: [StudyPoint] { studyGrid(quick: quick, baseEpochs: plan.classifierEpochs) }
    var calibrationText: String {
        "\(Self.methods.map(\.description).joined(separator: ", ")); \(Self.calibration.batches) x \(Self.calibration.batchSize) training images; seeds \((0..<seeds).map(String.init).joined(separator: ", "))"
    }
    var outputFolder: URL {
        URL(fileURLWithPath: resultsRoot).appendingPathComponent(quick ? "quick" : "").appendingPathComponent("exp02b")
    }

    /// Every model the study measures, in a fixed order (the shard index runs over it):
    /// classifiers by (block, recipe), each once even where two grid points share it, then
    /// the detectors.
    enum Unit: Equatable {
        case classifier(BlockKind, Baselines.ClassifierRecipe)
        case detector(BlockKind)
    }

    var units: [Unit] {
        var out: [Unit] = []
        for p in grid {
            let blocks: [BlockKind] = p.factor == "base" ? [.repvgg, .repopt, .qarepvgg] : [.repvgg, .repopt]
            for b in blocks {
                let r = p.recipe(for: b)
                if !out.contains(.classifier(b, r)) { out.append(.classifier(b, r)) }
            }
        }
        if !skipDetectors { out += Baselines.detectorBlocks.map { .detector($0) } }
        return out
    }

    func run() throws {
        let start = Date()
        if merge {
            let merged = try loadShards()
            // the report's wall time is the shards' measuring time plus the merge's own
            try writeMerged(merged, start: start.addingTimeInterval(-merged.shardSeconds))
            return
        }
        let s = try shard.map { try Shard(parsing: $0) } ?? .all
        var results = Exp02bResults(grid: grid, calibration: calibrationText, quick: quick)
        results.shards = [s.description]
        for (i, unit) in units.enumerated() where s.contains(i) {
            switch unit {
            case .classifier(let block, let recipe): results.classifiers.append(try measureClassifier(block, recipe))
            case .detector(let block): results.detectors.append(try measureDetector(block))
            }
        }
        if shard != nil {
            var provenance = Provenance.current()
            provenance.wallSeconds = Date().timeIntervalSince(start)
            results.provenance = provenance.summary
            let url = outputFolder.appendingPathComponent("shard-\(s.index)-of-\(s.count).json")
            try FileManager.default.createDirectory(at: outputFolder, withIntermediateDirectories: true)
            try AtomicFile.write(resultsJSON(results), to: url)
            print("wrote \(url.path); run with --merge once every shard has run")
            return
        }
        try writeMerged(results, start: start)
    }

    // MARK: - 1 Data, 2 Model, 3 Train or load

    func measureClassifier(_ block: BlockKind, _ recipe: Baselines.ClassifierRecipe) throws -> ModelResult {
        let (model, record, val) = try Baselines.classifier(block, plan: plan, recipe: recipe)
        let (train, _) = try Baselines.classificationData(plan: plan)
        return try measure(.classifier(model, train: train, val: val, label: "cls-\(block.rawValue) \(recipe)"), block: block,
                           model: "cls-\(block.rawValue)", recipe: recipe, trainSeconds: record.wallSeconds)
    }

    func measureDetector(_ block: BlockKind) throws -> ModelResult {
        let (train, _) = try Baselines.detectionData(plan: plan)
        let (model, record, val) = try Baselines.detector(block, plan: plan)
        // the primary calibrator only: a detector's evaluation costs ~10x a classifier's
        return try measure(.detector(model, train: train, val: val, label: "det-\(block.rawValue)"), block: block,
                           model: "det-\(block.rawValue)", recipe: nil, trainSeconds: record.wallSeconds, methods: [Self.primary])
    }

    // MARK: - 4 Quantize, 5 Evaluate

    func measure(_ subject: PTQSubject, block: BlockKind, model: String, recipe: Baselines.ClassifierRecipe?, trainSeconds: Double,
                 methods: [CalibrationMethod] = Exp02b.methods) throws -> ModelResult {
        let fp32 = try subject.evaluate("FP32 \(subject.label)")
        subject.module.eval()
        // the blocks as trained (before fusion): identity BN scales, centre-tap shares, spreads
        let blocks = subject.module.repBlockStatistics()
        subject.module.convertToDeployForm()
        let parameters = subject.module.parameters.reduce(0) { $0 + $1.count }
        var ptq: [String: [Double]] = [:]
        for g in Granularity.allCases {
            var options = QuantizationOptions()
            options.perChannelWeights = g == .perChannel
            let sweep = try ptqSweep(subject, methods: methods, seeds: (0..<seeds).map { UInt64($0) }, batches: Self.calibration.batches,
                                     batchSize: Self.calibration.batchSize, options: options) { seed, method, metric in
                print(String(format: "%@ %@ %@ seed %llu: FP32 %.4f -> INT8 %.4f", subject.label, g.rawValue, method.description, seed, fp32, metric))
            }
            for (m, v) in sweep { ptq[ptqKey(g, m)] = v }
        }
        return ModelResult(model: model, block: block.rawValue, recipe: recipe, parameters: parameters, fp32: fp32, trainSeconds: trainSeconds,
                           blocks: blocks, ptq: ptq)
    }

    // MARK: - Shards

    func loadShards() throws -> Exp02bResults {
        let files = ((try? FileManager.default.contentsOfDirectory(at: outputFolder, includingPropertiesForKeys: nil)) ?? [])
            .filter { $0.lastPathComponent.hasPrefix("shard-") && $0.pathExtension == "json" }.sorted { $0.path < $1.path }
        guard !files.isEmpty else { throw MergeError("--merge: no shard files (shard-i-of-n.json) in \(outputFolder.path); run with --shard i/n first") }
        var merged: Exp02bResults?
        for f in files {
            let part: Exp02bResults
            do { part = try JSONDecoder().decode(Exp02bResults.self, from: Data(contentsOf: f)) } catch {
                throw MergeError("--merge: \(f.path) is not an exp02b shard file: \(error)")
            }
            guard part.grid == grid, part.calibration == calibrationText, part.quick == quick else {
                throw MergeError("--merge: \(f.path) describes another grid or calibration (\(part.calibration)); expected \(calibrationText)")
            }
            if var m = merged {
                m.shardSeconds += part.provenance?.wallSeconds ?? 0
                m.classifiers += part.classifiers
                m.detectors += part.detectors
                m.shards += part.shards
                merged = m
            } else {
                merged = part
                merged?.shardSeconds = part.provenance?.wallSeconds ?? 0
            }
        }
        let m = merged!
        let counts = Set(m.shards.compactMap { try? Shard(parsing: $0).count })
        let have = Set(m.shards.compactMap { try? Shard(parsing: $0).index })
        guard counts.count == 1, let n = counts.first, have == Set(0..<n), m.shards.count == n else {
            throw MergeError("--merge: the shard files in \(outputFolder.path) are \(m.shards.joined(separator: ", ")); need every i/n of one n exactly once")
        }
        return m
    }

    // MARK: - 6 Report

    func writeMerged(_ measured: Exp02bResults, start: Date) throws {
        var results = measured
        results.rows = gapRows(grid: grid, models: results.classifiers, primary: Self.primary)
        results.factors = factorEffects(results.rows, grid: grid)
        let verdict = exp02bVerdict(rows: results.rows, factors: results.factors, classifiers: results.classifiers, quick: quick)
        results.verdict = verdict.text
        let paperDrop = Paper.relativeDrop(Paper.A1.repvggB1FP32, Paper.A1.repvggB1PTQ)
        let learned = results.rows.filter(\.learned)
        let best = learned.max { $0.gap < $1.gap }
        results.claims = [ClaimResult("A1", paper: "RepVGG-B1 under PTQ: \(signedPercent(-paperDrop)) (ImageNet)",
                                      ours: best.map { "largest RepVGG − RepOpt gap over the grid: \(String(format: "%.1f", 100 * $0.gap)) points (\($0.level), \($0.granularity) weights; RepVGG \(signedPercent($0.repvggChange)), RepOpt \(signedPercent($0.repoptChange)))" } ?? "no learned grid point",
                                      verdict: verdict)]
        var provenance = Provenance.current()
        provenance.seeds = Dictionary(uniqueKeysWithValues: (0..<seeds).map { ("calibration \($0)", UInt64($0)) })
        provenance.config = ["quick": String(quick), "calibration": calibrationText, "shards": results.shards.joined(separator: ", "),
                             "models": plan.modelsRoot.path, "classifier training (cached or not)": String(format: "%.0f s in all", results.classifiers.reduce(0) { $0 + $1.trainSeconds })]
        provenance.wallSeconds = Date().timeIntervalSince(start)
        results.provenance = provenance.summary
        let report = Exp02bReport(results: results, primary: Self.primary, seeds: seeds, provenance: provenance)
        let path = try writeResults(name: "exp02b", quick: quick, markdown: report.markdown, results: results, root: URL(fileURLWithPath: resultsRoot))
        print("\n\(results.verdict)\nwrote \(path.path)")
    }
}

/// A shard file that cannot be merged: the message names the file and what is wrong.
struct MergeError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

lineBufferStandardOutput() // progress and results reach a log file as they happen
Exp02b.main()
