import Foundation
import QuantLab

/// What exp06 measured, as written to results/exp06.json.
struct Exp06Results: Codable {
    /// Preprocessing alone (no engine): img/s of each pipeline at 1 worker and at all cores.
    struct Alone: Codable {
        var pipeline: String
        var workers: Int
        var round: Int
        var imagesPerSecond: Double
        var decodeMs: Double
        var transformMs: Double
        enum CodingKeys: String, CodingKey {
            case pipeline, workers, round
            case imagesPerSecond = "images_per_second", decodeMs = "decode_ms", transformMs = "transform_ms"
        }
    }

    /// One end-to-end serving run.
    struct Run: Codable {
        var engine: String   // "FP32" or "INT8"
        var pipeline: String // "baseline", "fused", "fused, int8 codes"
        var round: Int
        var report: ServingReport
    }

    /// Every configuration runs once per round, the rounds one after another: this VM's
    /// speed drifts within minutes, so a ratio is taken within a round (two runs seconds
    /// apart) and reported as the median over rounds with its range.
    var rounds: Int
    var servingImages: Int
    var averageKiB: Double
    var inputSize: Int
    /// DCT scale denominator the fused pipeline used on the serving images.
    var scaleDenominator: Int
    var alone: [Alone] = []
    var opencv: [Alone] = []
    var opencvVersion: String?
    var runs: [Run] = []
    /// FP32 model, val mAP of the serving images through each pipeline.
    var mapBaseline: Double = .nan
    var mapFused: Double = .nan
    var verdicts = Verdicts()
    /// A9 and A10 as exp08 and the README index show them.
    var claims: [ClaimResult] = []
    var provenance: ProvenanceSummary?

    struct Verdicts: Codable {
        var bottleneck = "", recovery = "", peer = "", accuracy = ""
        var all: [String] { [bottleneck, recovery, peer, accuracy] }
    }

    enum CodingKeys: String, CodingKey {
        case alone, opencv, runs, verdicts, claims, provenance, rounds
        case servingImages = "serving_images", averageKiB = "average_kib", inputSize = "input_size", scaleDenominator = "scale_denominator",
             opencvVersion = "opencv_version", mapBaseline = "map_baseline", mapFused = "map_fused"
    }

    /// The run of a configuration in each round, in round order.
    func runs(_ engine: String, _ pipeline: String, batch: Int) -> [ServingReport] {
        runs.filter { $0.engine == engine && $0.pipeline == pipeline && $0.report.config.maxBatch == batch }.sorted { $0.round < $1.round }.map(\.report)
    }
    /// The round with the median img/s (the lower of the two middle ones for an even count):
    /// the run a table shows for a configuration, every column from that one run.
    func run(_ engine: String, _ pipeline: String, batch: Int) -> ServingReport? {
        Statistics.lowerMedian(runs(engine, pipeline, batch: batch), by: \.imagesPerSecond)
    }
    func alones(_ pipeline: String, workers: Int) -> [Alone] {
        (alone + opencv).filter { $0.pipeline == pipeline && $0.workers == workers }.sorted { $0.round < $1.round }
    }
    func alone(_ pipeline: String, workers: Int) -> Alone? { Statistics.lowerMedian(alones(pipeline, workers: workers), by: \.imagesPerSecond) }
}

/// a / b within each round (rounds both have), as the median over rounds and the range.
struct RoundRatio {
    var values: [Double]
    init(_ a: [Double], _ b: [Double]) { values = zip(a, b).map { $0 / $1 } }
    var median: Double { Statistics.lowerMedian(values) { $0 } ?? .nan }
    var text: String {
        values.count < 2 ? String(format: "%.2fx", median) : String(format: "%.2fx (rounds %.2f-%.2f)", median, values.min()!, values.max()!)
    }
    /// "met" / "not met" on the median, and how many rounds met it.
    func target(_ t: Double) -> String {
        let met = values.filter { $0 >= t }.count
        return (median >= t ? "met" : "not met") + (values.count > 1 ? ", \(met) of \(values.count) rounds" : "")
    }
}

/// The verdicts, computed from the numbers.
func exp06Verdicts(_ r: Exp06Results, quick: Bool) -> (Exp06Results.Verdicts, [ClaimResult]) {
    var v = Exp06Results.Verdicts()
    var claims: [ClaimResult] = []
    // A smoke run's tiny model shows the mechanism, not a result: its outcomes are inconclusive.
    func q(_ o: Outcome) -> Outcome { quick ? .inconclusive : o }
    let quickNote = quick ? " (QUICK: tiny model, few images — the mechanism only)" : ""
    let ips = { (runs: [ServingReport]) in runs.map(\.imagesPerSecond) }
    if let fb = r.run("FP32", "baseline", batch: 1), let ib = r.run("INT8", "baseline", batch: 1) {
        let speedup = RoundRatio(ips(r.runs("INT8", "baseline", batch: 1)), ips(r.runs("FP32", "baseline", batch: 1)))
        let share = { (x: ServingReport) in (x.msPerImage.decode + x.msPerImage.transform) / (x.msPerImage.decode + x.msPerImage.transform + x.msPerImage.engine) }
        v.bottleneck = String(format: "A9: INT8 serves %@ FP32's img/s (article: +%@%% over FP16). Preprocessing is %.0f%% of the CPU time per image with FP32 and %.0f%% with INT8; ",
                              speedup.text, Paper.A9.int8OverFP16.text, 100 * share(fb), 100 * share(ib))
        v.bottleneck += ib.bottleneck == "preprocessing"
            ? "with INT8 the bottleneck is preprocessing, as in the article." + quickNote
            : "the bottleneck stays the engine: here it shares the CPU with preprocessing, so INT8 does not move the bottleneck (the article's engine ran on a GPU)." + quickNote
        claims.append(ClaimResult("A9", paper: "INT8 \(Paper.A9.int8QPS.text) img/s (+\(Paper.A9.int8OverFP16.text)% over FP16), CPU >\(Paper.A9.cpuBusy.text)% busy preprocessing",
                                  ours: String(format: "INT8 %.2fx FP32 end to end; preprocessing %.0f%% of CPU per image; bottleneck: %@",
                                               speedup.median, 100 * share(ib), ib.bottleneck),
                                  verdict: Verdict(q(ib.bottleneck == "preprocessing" ? .reproduced : .notReproduced), v.bottleneck)))
    }
    let cores = r.alone.map(\.workers).max() ?? 1
    if r.run("INT8", "baseline", batch: 1) != nil, r.run("INT8", "fused, int8 codes", batch: 1) != nil,
       let ab = r.alone("baseline", workers: cores), let af = r.alone("fused", workers: cores) {
        let gain = RoundRatio(ips(r.runs("INT8", "fused, int8 codes", batch: 1)), ips(r.runs("INT8", "baseline", batch: 1)))
        let capacity = RoundRatio(r.alones("fused", workers: cores).map(\.imagesPerSecond), r.alones("baseline", workers: cores).map(\.imagesPerSecond))
        v.recovery = String(format: "A10: end to end, INT8 with the fused pipeline serves %@ the baseline pipeline (article, DALI: %@x). With the engine off the CPU (the article's setting) throughput would be preprocessing's on all %d cores: fused %.0f vs baseline %.0f img/s, %@.",
                            gain.text, Paper.A10.daliSpeedup.text, cores, af.imagesPerSecond, ab.imagesPerSecond, capacity.text) + quickNote
        // reproduced at 90% of the article's factor; partly when clearly above 1 (10%)
        let g = gain.median
        claims.append(ClaimResult("A10", paper: "INT8 + DALI \(Paper.A10.daliQPS.text) img/s, \(Paper.A10.daliSpeedup.text)x",
                                  ours: String(format: "fused CPU pipeline %.2fx end to end; %.2fx as preprocessing capacity on %d cores", g, capacity.median, cores),
                                  verdict: Verdict(q(g >= 0.9 * Paper.A10.daliSpeedup.value ? .reproduced : g >= 1.1 ? .partly : .notReproduced), v.recovery)))
    }
    if let f = r.alone("fused", workers: 1), r.alone("baseline", workers: 1) != nil {
        let fused = r.alones("fused", workers: 1).map(\.imagesPerSecond)
        let vsBase = RoundRatio(fused, r.alones("baseline", workers: 1).map(\.imagesPerSecond))
        let opencv = r.alones("OpenCV", workers: 1).map(\.imagesPerSecond)
        if !opencv.isEmpty, let o = r.alone("OpenCV", workers: 1) {
            let vsCV = RoundRatio(fused, opencv)
            v.peer = String(format: "Peer, 1 worker: fused %.0f img/s = %@ OpenCV (%.0f; target 1.5x: %@) and %@ our baseline (target 2x: %@).",
                            f.imagesPerSecond, vsCV.text, o.imagesPerSecond, vsCV.target(1.5), vsBase.text, vsBase.target(2))
        } else {
            v.peer = String(format: "Peer: OpenCV not available (make venv); fused = %@ our baseline (target 2x: %@).", vsBase.text, vsBase.target(2))
        }
        v.peer += String(format: " The floor is libjpeg-turbo's entropy decoding, which DCT scaling does not skip: the fused decode still costs %.2f ms of its %.2f ms.",
                         f.decodeMs, f.decodeMs + f.transformMs)
    }
    let d = r.mapFused - r.mapBaseline
    v.accuracy = String(format: "Accuracy: FP32 mAP on the serving images %.4f with the baseline pipeline, %.4f with the fused one (%+.4f): ", r.mapBaseline, r.mapFused, d)
        + (abs(d) <= 0.005 ? "the DCT-domain downscale does not cost accuracy here." : "the fused pipeline's different low-pass moves accuracy by more than 0.005: check before deploying it.")
    return (v, claims)
}
