import Foundation
import QuantLab

/// One point of the classifier grid: the factor it varies away from the base recipe, and how.
struct StudyPoint: Codable, Equatable {
    /// "base", "training length", "width", "weight decay", "decay form".
    var factor: String
    var level: String
    var recipe: Baselines.ClassifierRecipe
    /// Whether the factor's levels include the base point (false where the factor is varied
    /// around another point of its own, as width is at 5 epochs).
    var comparedToBase = true

    /// The recipe `block` is trained with at this point (as the models are cached and stored).
    func recipe(for block: BlockKind) -> Baselines.ClassifierRecipe {
        var r = recipe.normalized(for: block)
        r.epochs = recipe.epochs
        return r
    }
}

/// The grid. One factor at a time around the baseline recipe (the classifiers exp00 and exp02
/// use, so the base point costs nothing), because a full factorial is out of reach on 2 cores.
func studyGrid(quick: Bool, baseEpochs: Int) -> [StudyPoint] {
    typealias R = Baselines.ClassifierRecipe
    let base = StudyPoint(factor: "base", level: "\(baseEpochs) epochs, x1, decay 1e-4", recipe: R(epochs: baseEpochs))
    if quick {
        return [base,
                StudyPoint(factor: "training length", level: "8 epochs", recipe: R(epochs: 8)),
                StudyPoint(factor: "width (8 epochs)", level: "x1", recipe: R(epochs: 8), comparedToBase: false),
                StudyPoint(factor: "width (8 epochs)", level: "x2", recipe: R(epochs: 8, widthMultiplier: 2), comparedToBase: false),
                StudyPoint(factor: "weight decay", level: "0", recipe: R(epochs: baseEpochs, weightDecay: 0)),
                StudyPoint(factor: "decay form", level: "RepVGG custom L2", recipe: R(epochs: baseEpochs, decayForm: .repvggCustomL2))]
    }
    // (the quick grid compares width at 8 epochs, where x2's cost is small)
    return [base,
            StudyPoint(factor: "training length", level: "5 epochs", recipe: R(epochs: 5)),
            StudyPoint(factor: "training length", level: "30 epochs", recipe: R(epochs: 30)),
            StudyPoint(factor: "width", level: "x2", recipe: R(epochs: baseEpochs, widthMultiplier: 2)),
            // (decay 0 is in the quick grid; the full grid has 5e-4 only, for time: see the README)
            StudyPoint(factor: "weight decay", level: "5e-4 (YOLOv6's)", recipe: R(epochs: baseEpochs, weightDecay: 5e-4)),
            StudyPoint(factor: "decay form", level: "RepVGG custom L2", recipe: R(epochs: baseEpochs, decayForm: .repvggCustomL2))]
}

/// Weight quantization granularity (activations are per tensor in both).
enum Granularity: String, Codable, CaseIterable {
    case perChannel = "per-channel"
    case perTensor = "per-tensor"
}

/// The key of one PTQ result list: "per-channel entropy".
func ptqKey(_ g: Granularity, _ m: CalibrationMethod) -> String { "\(g.rawValue) \(m)" }

/// One trained model of the study, measured: FP32, its blocks before fusion, and PTQ per
/// (granularity, calibrator), one value per calibration seed.
struct ModelResult: Codable, Equatable {
    /// "cls-repvgg" or "det-repopt".
    var model: String
    var block: String
    /// The classifier's recipe with its epochs resolved; nil for a detector baseline.
    var recipe: Baselines.ClassifierRecipe?
    var parameters: Int
    var fp32: Double
    var trainSeconds: Double
    var blocks: [RepBlockStatistics]
    var ptq: [String: [Double]]

    func values(_ g: Granularity, _ m: CalibrationMethod) -> [Double] { ptq[ptqKey(g, m)] ?? [] }
    /// (INT8 − FP32) / FP32, mean over seeds: negative is a loss.
    func change(_ g: Granularity, _ m: CalibrationMethod) -> Double { fp32 > 0 ? (Statistics.mean(values(g, m)) - fp32) / fp32 : .nan }
    /// The seed spread relative to FP32.
    func noise(_ g: Granularity, _ m: CalibrationMethod) -> Double { fp32 > 0 ? Statistics.standardDeviation(values(g, m)) / fp32 : .nan }

    var medianSpread: Double { median(blocks.map(\.channelRangeSpread)) }
    var maxSpread: Double { blocks.map(\.channelRangeSpread).max() ?? .nan }
    var identityScaleMax: Double? { blocks.compactMap(\.identityScaleMax).max() }
    var identityShare: Double? {
        let s = blocks.compactMap(\.identityCentreShare)
        return s.isEmpty ? nil : Statistics.mean(s)
    }
}

/// What exp02b measured (results/exp02b.json; a shard writes the same with part of the models).
struct Exp02bResults: Codable {
    var grid: [StudyPoint]
    /// "entropy, max; 4 x 32 training images; seeds 0, 1, 2": shards must agree to be merged.
    var calibration: String
    var quick: Bool
    var classifiers: [ModelResult] = []
    var detectors: [ModelResult] = []
    /// The shards merged into this file ("0/1" for an unsharded run).
    var shards: [String] = []
    var rows: [GapRow] = []
    var factors: [FactorEffect] = []
    var verdict = ""
    var claims: [ClaimResult] = []
    var provenance: ProvenanceSummary?
    /// Measuring time of the shards merged (not written: it is the provenance's wall time).
    var shardSeconds: Double = 0

    enum CodingKeys: String, CodingKey {
        case grid, calibration, quick, classifiers, detectors, shards, rows, factors, verdict, claims, provenance
    }
}

/// RepVGG against RepOpt at one grid point and one weight granularity (entropy, the primary).
struct GapRow: Codable, Equatable {
    var factor: String
    var level: String
    var granularity: String
    var repvggFP32: Double, repoptFP32: Double
    var repvggChange: Double, repoptChange: Double
    /// RepVGG's drop minus RepOpt's (relative, as fractions): positive = RepVGG loses more.
    var gap: Double
    var noise: Double
    var learned: Bool

    /// "RepVGG loses more" beyond twice the noise and 1 point, the rule of exp02.
    var reading: String {
        guard learned else { return "not learned" }
        let threshold = max(2 * noise, 0.01)
        return gap > threshold ? "RepVGG loses more" : gap < -threshold ? "RepOpt loses more" : "no clear difference"
    }
}

/// How far one factor moves the gap: its range over the factor's levels and the base.
struct FactorEffect: Codable, Equatable {
    var factor: String
    var granularity: String
    var levels: [String]
    var gaps: [Double]
    /// Each level's seed noise of the gap (as `GapRow.noise`).
    var noises: [Double]
    /// Twice the noise of the difference between the two extreme levels: a range below it is
    /// no effect.
    var threshold: Double {
        guard gaps.count >= 2, let hi = gaps.indices.max(by: { gaps[$0] < gaps[$1] }), let lo = gaps.indices.min(by: { gaps[$0] < gaps[$1] }) else { return .nan }
        return 2 * (noises[hi] * noises[hi] + noises[lo] * noises[lo]).squareRoot()
    }
    /// NaN with fewer than two learned levels (no effect can be read).
    var range: Double { gaps.count < 2 ? .nan : gaps.max()! - gaps.min()! }
}

/// The RepVGG / RepOpt gap of every grid point, per granularity.
func gapRows(grid: [StudyPoint], models: [ModelResult], primary: CalibrationMethod) -> [GapRow] {
    func find(_ block: BlockKind, _ p: StudyPoint) -> ModelResult? {
        models.first { $0.block == block.rawValue && $0.recipe == p.recipe(for: block) }
    }
    return grid.flatMap { p -> [GapRow] in
        guard let v = find(.repvgg, p), let o = find(.repopt, p) else { return [] }
        return Granularity.allCases.map { g in
            let (nv, no) = (v.noise(g, primary), o.noise(g, primary))
            return GapRow(factor: p.factor, level: p.level, granularity: g.rawValue, repvggFP32: v.fp32, repoptFP32: o.fp32,
                          repvggChange: v.change(g, primary), repoptChange: o.change(g, primary),
                          gap: o.change(g, primary) - v.change(g, primary), noise: (nv * nv + no * no).squareRoot(),
                          learned: min(v.fp32, o.fp32) >= LearnedFloor.classifierTop1)
        }
    }
}

/// Each factor's effect on the gap (the base point counts as one of its levels unless the
/// factor is varied around a point of its own).
func factorEffects(_ rows: [GapRow], grid: [StudyPoint]) -> [FactorEffect] {
    var factors: [String] = []
    for r in rows where r.factor != "base" && !factors.contains(r.factor) { factors.append(r.factor) }
    return Granularity.allCases.flatMap { g in
        let base = rows.first { $0.factor == "base" && $0.granularity == g.rawValue }
        return factors.map { f in
            let own = rows.filter { $0.factor == f && $0.granularity == g.rawValue }
            let withBase = grid.first { $0.factor == f }?.comparedToBase ?? true
            let all = ((withBase ? (base.map { [$0] } ?? []) : []) + own).filter(\.learned)
            return FactorEffect(factor: f, granularity: g.rawValue, levels: all.map(\.level), gaps: all.map(\.gap), noises: all.map(\.noise))
        }
    }
}

/// The answer: where, if anywhere, RepVGG loses clearly more than RepOpt; which factor moves
/// the gap most; the trend when the collapse never appears.
func exp02bVerdict(rows: [GapRow], factors: [FactorEffect], classifiers: [ModelResult], quick: Bool) -> Verdict {
    let paperDrop = Paper.relativeDrop(Paper.A1.repvggB1FP32, Paper.A1.repvggB1PTQ)
    let learned = rows.filter(\.learned)
    let prefix = quick ? "QUICK smoke run (tiny models; not a result): " : ""
    guard !learned.isEmpty else {
        return Verdict(.inconclusive, prefix + "Inconclusive: no grid point has both classifiers above \(Int(100 * LearnedFloor.classifierTop1))% top-1.")
    }
    let biggest = factors.filter { !$0.range.isNaN }.max { $0.range < $1.range }
    let mover = biggest.map { f in
        String(format: "the factor that moves the gap most is %@ (%@ weights: %.1f points between its levels, %@ twice their noise, %.1f)", f.factor, f.granularity,
               100 * f.range, f.range > f.threshold ? "beyond" : "within", 100 * f.threshold)
    } ?? "no factor has two learned levels"
    let collapses = learned.filter { $0.reading == "RepVGG loses more" }
    let largest = classifiers.max { $0.parameters < $1.parameters }
    let longest = classifiers.compactMap(\.recipe?.epochs).max() ?? 0
    let worst = learned.min { $0.repvggChange < $1.repvggChange }!
    let scale = String(format: "largest model tried %.2f M parameters (width x%d), longest training %d epochs; RepVGG's largest loss %@ (%@, %@ weights)",
                       Double(largest?.parameters ?? 0) / 1e6, largest?.recipe?.widthMultiplier ?? 1, longest, signedPercent(worst.repvggChange),
                       worst.level, worst.granularity)
    if collapses.isEmpty {
        let outcome: Outcome = quick ? .inconclusive : .notReproduced
        return Verdict(outcome, prefix + "Not reproduced anywhere in the grid: at no point does RepVGG lose clearly more than RepOpt under PTQ (\(learned.count) learned point-granularity pairs); \(scale); \(mover).")
    }
    let sized = collapses.filter { -$0.repvggChange >= paperDrop / 2 }
    let list = collapses.map { "\($0.level) (\($0.granularity): gap \(String(format: "%.1f", 100 * $0.gap)) points)" }.joined(separator: ", ")
    let outcome: Outcome = quick ? .inconclusive : sized.isEmpty ? .partly : .reproduced
    return Verdict(outcome, prefix + (sized.isEmpty ? "Direction only" : "Direction and size") + ": RepVGG loses clearly more than RepOpt at \(list)"
                   + (sized.isEmpty ? String(format: ", never half the paper's %@", signedPercent(-paperDrop)) : "") + "; \(scale); \(mover).")
}
