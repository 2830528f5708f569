import Foundation
import QuantLab

/// What exp02 measured, as written to results/exp02.json.
struct Exp02Results: Codable {
    /// One model's numbers: FP32, FP32 after conversion to the deploy form, and INT8 per
    /// calibrator (one value per calibration seed, in seed order).
    struct Arm: Codable {
        var fp32: Double
        var fp32Deploy: Double
        var ptq: [String: [Double]]
        /// The primary calibrator's first seed, simulator vs INT8 engine.
        var engine: EngineCheck?

        enum CodingKeys: String, CodingKey {
            case fp32, ptq, engine
            case fp32Deploy = "fp32_deploy"
        }

        func values(_ m: CalibrationMethod) -> [Double] { ptq[m.description] ?? [] }
        func mean(_ m: CalibrationMethod) -> Double { Statistics.mean(values(m)) }
        func spread(_ m: CalibrationMethod) -> Double { Statistics.standardDeviation(values(m)) }
        /// (FP32 − INT8) / FP32, the drop that can be set beside the paper's.
        func relativeDrop(_ m: CalibrationMethod) -> Double { fp32 > 0 ? (fp32 - mean(m)) / fp32 : 0 }
    }

    /// By block name (repvgg, qarepvgg, repopt).
    var detectors: [String: Arm] = [:]
    var classifiers: [String: Arm] = [:]
    var primaryCalibrator: String
    var verdict = ""
    var classifierVerdict: String?
    /// A3 (detector) and A1 (classifier) as exp08 and the README index show them.
    var claims: [ClaimResult] = []
    var provenance: ProvenanceSummary?

    enum CodingKeys: String, CodingKey {
        case detectors, classifiers, verdict, claims, provenance
        case primaryCalibrator = "primary_calibrator"
        case classifierVerdict = "classifier_verdict"
    }
}

/// The paper's side of one comparison: each block's relative drop under PTQ.
struct PaperDrops {
    var repvgg: Double, repopt: Double, text: String

    /// YOLOv6s on COCO (CLAIMS.md A3).
    static let detector = PaperDrops(
        repvgg: Paper.relativeDrop(Paper.A3.yolov6sFP32, Paper.A3.repvggPTQ),
        repopt: Paper.relativeDrop(Paper.A3.yolov6sFP32, Paper.A3.repoptPTQ),
        text: String(format: "RepVGG loses %.1f mAP (%@ of %@), RepOpt %.1f (%@)",
                     Paper.A3.yolov6sFP32.value - Paper.A3.repvggPTQ.value, signedPercent(-Paper.relativeDrop(Paper.A3.yolov6sFP32, Paper.A3.repvggPTQ)),
                     Paper.A3.yolov6sFP32.text, Paper.A3.yolov6sFP32.value - Paper.A3.repoptPTQ.value,
                     signedPercent(-Paper.relativeDrop(Paper.A3.yolov6sFP32, Paper.A3.repoptPTQ))))

    /// RepVGG-B1 and RepOpt-VGG-B1 on ImageNet (CLAIMS.md A1, A3).
    static let classifier = PaperDrops(
        repvgg: Paper.relativeDrop(Paper.A1.repvggB1FP32, Paper.A1.repvggB1PTQ),
        repopt: Paper.relativeDrop(Paper.A3.repoptB1FP32, Paper.A3.repoptB1PTQ),
        text: String(format: "RepVGG-B1 loses %.1f points (%@), RepOpt-B1 %.1f (%@)",
                     Paper.A1.repvggB1FP32.value - Paper.A1.repvggB1PTQ.value, signedPercent(-Paper.relativeDrop(Paper.A1.repvggB1FP32, Paper.A1.repvggB1PTQ)),
                     Paper.A3.repoptB1FP32.value - Paper.A3.repoptB1PTQ.value, signedPercent(-Paper.relativeDrop(Paper.A3.repoptB1FP32, Paper.A3.repoptB1PTQ))))
}

/// The verdict from the numbers: RepVGG's relative drop against RepOpt's with the primary
/// calibrator. The noise is the standard deviation of the difference of the two means over
/// calibration seeds, sqrt(sd_a² + sd_b²) relative to FP32; a gap must exceed twice it and 1%
/// to count. "In size" means RepVGG's drop reaches at least half the paper's.
func exp02Verdict(_ arms: [String: Exp02Results.Arm], primary: CalibrationMethod, metric: String, quick: Bool,
                  paper: PaperDrops) -> Verdict {
    let learnedFloor = LearnedFloor.floor(metric: metric)
    guard let repvgg = arms[BlockKind.repvgg.rawValue], let repopt = arms[BlockKind.repopt.rawValue] else {
        return Verdict(.inconclusive, "Inconclusive: the RepVGG and RepOpt arms are both needed.")
    }
    if min(repvgg.fp32, repopt.fp32) < learnedFloor {
        return Verdict(.inconclusive, String(format: "Inconclusive: the FP32 baselines have not learned enough (%@ %.3f and %.3f, below %.2f)%@.",
                      metric, repvgg.fp32, repopt.fp32, learnedFloor, quick ? "; expected for the QUICK smoke run" : ""))
    }
    let smoke = quick ? "QUICK smoke run (tiny models; not a result): " : ""
    let (dv, dopt) = (repvgg.relativeDrop(primary), repopt.relativeDrop(primary))
    let (nv, nopt) = (repvgg.spread(primary) / repvgg.fp32, repopt.spread(primary) / repopt.fp32)
    let noise = (nv * nv + nopt * nopt).squareRoot()
    let gap = dv - dopt
    let detail = String(format: "Under PTQ RepVGG's FP32 %@ changes by %@ (%.3f → %.3f), RepOpt's by %@ (%.3f → %.3f); noise of the difference ±%.1f%%; paper: %@",
                        metric, signedPercent(-dv), repvgg.fp32, repvgg.mean(primary), signedPercent(-dopt), repopt.fp32, repopt.mean(primary), 100 * noise, paper.text)
    let threshold = max(2 * noise, 0.01)
    if gap > threshold {
        let size = dv >= paper.repvgg / 2 ? "in direction and size"
            : "in direction only (RepVGG's change is \(signedPercent(-dv)), the paper's \(signedPercent(-paper.repvgg)))"
        // a smoke run's models are too small to carry a result: its outcome is inconclusive
        return Verdict(quick ? .inconclusive : dv >= paper.repvgg / 2 ? .reproduced : .partly,
                       smoke + "Reproduced \(size): RepVGG degrades clearly more than RepOpt. " + detail + ".")
    }
    if gap < -threshold {
        return Verdict(quick ? .inconclusive : .notReproduced, smoke + "Not reproduced: RepOpt degrades more than RepVGG here. " + detail + ".")
    }
    return Verdict(quick ? .inconclusive : .notReproduced,
                   smoke + String(format: "Not reproduced (no clear difference): the gap of %.1f percentage points is within twice the noise or 1 point. ", 100 * gap) + detail + ".")
}

/// One arm pair as a claim row: the paper's drops beside ours under the primary calibrator.
func exp02Claim(_ id: String, arms: [String: Exp02Results.Arm], primary: CalibrationMethod, paper: PaperDrops, what: String, verdict: Verdict) -> ClaimResult {
    func change(_ b: BlockKind) -> String { arms[b.rawValue].map { signedPercent(-$0.relativeDrop(primary)) } ?? "—" }
    return ClaimResult(id, paper: "\(what) under PTQ: RepVGG \(signedPercent(-paper.repvgg)), RepOpt \(signedPercent(-paper.repopt))",
                       ours: "\(what) under \(primary) PTQ: RepVGG \(change(.repvgg)), RepOpt \(change(.repopt)), QARepVGG \(change(.qarepvgg))", verdict: verdict)
}
