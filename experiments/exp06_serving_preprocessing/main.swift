// exp06 — serving throughput and the preprocessing bottleneck (the DALI experiment).
//
// Claims (CLAIMS.md A9, A10): on a T4 with a 16-core CPU, the INT8 YOLOv6s engine served 552
// img/s, 40% above FP16, with the CPU above 1500% busy preprocessing: once INT8 made the model
// fast, preprocessing was the bottleneck. Decoding and preprocessing on the GPU (DALI) gave 1182
// img/s (2.14x), the CPU down to ~1100%; FP16 + DALI gained nothing (GPU-bound).
//
// What we expect: on one CPU, engine and preprocessing share the cores, so the question becomes
// how large each stage's cost per image is and which one sets the pace. The fused pipeline
// (DCT-domain downscaled decode, one resize + pad + normalise pass, or int8 codes straight into
// the INT8 plan) is DALI's idea without a GPU: it must cut preprocessing's cost per image.
//
// Protocol: the RepOpt detector of exp00; 640x480 JPEGs at quality 90 (shapes-serving); every
// pipeline alone at 1 worker and at all cores, beside OpenCV on the same files and threads; then
// the serving loop (1 worker -> bounded queue -> 1 engine instance, batch 1 and dynamic batching
// up to 8) for FP32 and INT8 x baseline and fused; FP32 mAP of the serving images through each
// pipeline.
//
// Files: main.swift (the pipeline), Results.swift (what is measured, the verdicts), Report.swift
// (results/exp06.md).
//
// Run: `make exp06` (~5 min on 2 AVX2 cores once the RepOpt baseline exists: 5 rounds), `make exp06 QUICK=1`
// (tiny model, 2 rounds, ~30 s).
import ArgumentParser
import Foundation
import QuantLab

struct Exp06: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "exp06_serving_preprocessing",
                                                    abstract: "Serving throughput: FP32 vs INT8 engine x baseline vs fused preprocessing; which stage limits it.")

    @Flag(help: "Tiny model, fewer images served, results to results/quick/.") var quick = false
    @Option(help: "Images per serving run (default 600, 60 with --quick).") var count: Int?
    @Option(help: "Rounds: every configuration runs once per round; ratios are taken within a round, medians over rounds (default 5, 2 with --quick).") var rounds: Int?
    @Option(help: "Where datasets live.") var dataRoot = "data"
    @Option(help: "Where trained baselines are cached.") var modelsRoot = "data/models"

    func validate() throws {
        if let c = count, !(10...1_000_000).contains(c) { throw ValidationError("--count must be in 10...1000000, got \(c)") }
        if let r = rounds, !(1...100).contains(r) { throw ValidationError("--rounds must be in 1...100, got \(r)") }
    }

    func run() throws {
        let start = Date()
        let plan = Baselines.Plan(quick: quick, dataRoot: URL(fileURLWithPath: dataRoot), modelsRoot: URL(fileURLWithPath: modelsRoot))
        let images = count ?? (quick ? 60 : 600), rounds = self.rounds ?? (quick ? 2 : 5)

        // MARK: - 1 Data: the serving set (and the training set, for calibration)
        let servingRoot = try SyntheticShapes(.serving).write(root: plan.dataRoot)
        let servingSet = try DetectionDataset(root: servingRoot, split: "val2017")
        let folder = servingRoot.appendingPathComponent("val2017")
        let files = try readServingImages(folder)
        let (train, _) = try Baselines.detectionData(plan: plan)

        // MARK: - 2 Model
        let (model, _, _) = try Baselines.detector(.repopt, plan: plan)
        let size = model.config.inputSize
        let fused = ServingPreprocessor(.fused, size: size), baseline = ServingPreprocessor(.baseline, size: size)
        var results = Exp06Results(rounds: rounds, servingImages: files.count, averageKiB: Double(files.reduce(0) { $0 + $1.data.count }) / Double(files.count) / 1024,
                                   inputSize: size, scaleDenominator: fused.scaleDenominator(width: servingSet.images[0].width, height: servingSet.images[0].height))

        // MARK: - 3 Accuracy through each pipeline (FP32)
        results.mapBaseline = try evaluateDetector(model, on: servingSet, progressLabel: "mAP, baseline pipeline", preprocessor: baseline).0.mAP
        results.mapFused = try evaluateDetector(model, on: servingSet, progressLabel: "mAP, fused pipeline", preprocessor: fused).0.mAP

        // MARK: - 4 Preprocessing alone, and OpenCV on the same files and threads
        let cores = Kernels.threads
        let openCV = OpenCVPeer.locate().flatMap { $0.isAvailable ? $0 : nil } // starts Python: once, not every round
        if openCV == nil { print("OpenCV: no Python with cv2 (make venv installs it); the peer row is left out") }
        for round in 0..<rounds {
            for workers in Set([1, cores]).sorted() {
                for (name, p, codes) in [("baseline", baseline, false), ("fused", fused, false), ("fused, int8 codes", fused, true)] {
                    var c = ServingConfig()
                    (c.workers, c.instances, c.images, c.codesIn) = (workers, 0, images, codes)
                    let r = try serve(files: files, preprocessor: p, instances: [], config: c)
                    results.alone.append(.init(pipeline: name, workers: workers, round: round, imagesPerSecond: r.imagesPerSecond,
                                               decodeMs: r.msPerImage.decode, transformMs: r.msPerImage.transform))
                    print(String(format: "round %d/%d, alone, %d worker(s), %@: %.1f img/s", round + 1, rounds, workers, name, r.imagesPerSecond))
                }
                if let peer = openCV {
                    let o = try peer.run(folder: folder, size: size, images: images, threads: workers)
                    results.opencvVersion = o.opencv
                    results.opencv.append(.init(pipeline: "OpenCV", workers: workers, round: round, imagesPerSecond: o.img_per_s, decodeMs: .nan, transformMs: .nan))
                    print(String(format: "round %d/%d, alone, %d worker(s), OpenCV: %.1f img/s", round + 1, rounds, workers, o.img_per_s))
                }
            }
        }

        // MARK: - 5 Serving: FP32 graph, then the INT8 plan
        model.eval()
        model.convertToDeployForm()
        let fp32 = try servingInstances(model, count: 1, maxBatch: 8)
        let sim = try prepareDetectorPTQ(model, train: train, method: .entropy, calibration: CalibrationPlan(batches: 4, batchSize: 32, seed: 0))
        let int8 = try servingInstances(model, count: 1, maxBatch: 8)
        sim.remove()
        for round in 0..<rounds {
            for batch in [1, 8] {
                for (engine, instances) in [("FP32", fp32), ("INT8", int8)] {
                    let pipelines: [(String, ServingPreprocessor, Bool)] = engine == "INT8"
                        ? [("baseline", baseline, false), ("fused, int8 codes", fused, true)] : [("baseline", baseline, false), ("fused", fused, false)]
                    for (name, p, codes) in pipelines {
                        var c = ServingConfig()
                        (c.workers, c.instances, c.maxBatch, c.images, c.codesIn) = (1, 1, batch, images, codes)
                        let r = try serve(files: files, preprocessor: p, instances: instances, config: c,
                                          progressLabel: "round \(round + 1)/\(rounds) \(engine) \(name) b\(batch)")
                        print("round \(round + 1)/\(rounds) \(engine): " + r.summary)
                        results.runs.append(.init(engine: engine, pipeline: name, round: round, report: r))
                    }
                }
            }
        }

        // MARK: - 6 Report
        (results.verdicts, results.claims) = exp06Verdicts(results, quick: quick)
        var provenance = Provenance.current()
        provenance.seeds = ["calibration images": 0]
        provenance.config = ["quick": String(quick), "images per run": String(images), "rounds": String(rounds), "serving set": SyntheticShapes.Config.serving.name,
                             "isa": "\(Kernels.isa)", "threads": String(cores)]
        provenance.wallSeconds = Date().timeIntervalSince(start)
        results.provenance = provenance.summary
        let report = Exp06Report(results: results, quick: quick, kernels: Kernels.summary, provenance: provenance)
        let path = try writeResults(name: "exp06", quick: quick, markdown: report.markdown, results: results)
        let configurations = [("FP32", "baseline"), ("FP32", "fused"), ("INT8", "baseline"), ("INT8", "fused, int8 codes")]
        let bars = configurations.compactMap { engine, pipeline in results.run(engine, pipeline, batch: 1).map { (engine, pipeline, $0) } }.map { engine, pipeline, run in
            (label: "\(engine), \(pipeline)", segments: [run.msPerImage.decode, run.msPerImage.transform, run.msPerImage.engine])
        }
        let svg = SVG.stackedBars(bars, segmentNames: ["decode", "resize + normalise", "engine"], title: "CPU ms per image by stage (batch 1)", yLabel: "ms per image")
        let figures = path.deletingLastPathComponent().appendingPathComponent("exp06")
        try AtomicFile.createFolder(figures)
        try SVG.write(svg, to: figures.appendingPathComponent("stages.svg"))
        for v in results.verdicts.all { print(v) }
        print("wrote \(path.path)")
    }
}

lineBufferStandardOutput() // progress and results reach a log file as they happen
Exp06.main()
