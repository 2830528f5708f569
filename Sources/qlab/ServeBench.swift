import ArgumentParser
import Foundation
import QuantLab

struct ServeBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve-bench",
        abstract: "Serving throughput: preprocessing workers -> bounded queue -> engine instances; which stage limits it.",
        discussion: """
        Reads the JPEGs of --images into memory, then serves --count images (the set cycled): --workers threads decode \
        and preprocess each (--pipeline baseline: full decode, resize, pad, normalise as separate passes; fused: DCT-domain \
        downscaled decode and one fused resize + pad + normalise pass), --instances engine instances (FP32 graph, or the \
        INT8 plan with --int8) take up to --max-batch waiting images at a time. Prints img/s, each stage's busy share, CPU \
        utilisation (getrusage) and the bottleneck. First, each pipeline alone (no engine) and, with --opencv, OpenCV's \
        imdecode + resize + normalise on the same files and threads (scripts/opencv_preprocess.py, `make venv`). A file \
        that fails to decode is counted and skipped. Point --images at COCO's val2017 to serve real photos.
        """)

    @Option(help: "The detector (model.safetensors).") var model = "data/models/det-repopt/model.safetensors"
    @Option(help: "Folder of JPEG files to serve (make one: qlab make-data --preset shapes-serving).") var images = "data/shapes-serving/val2017"
    @Option(help: "Dataset whose training split calibrates --int8 (default data/shapes).") var data = "data/shapes"
    @Flag(help: "Serve the INT8 plan (entropy calibration on 4 x 32 training images) instead of the FP32 graph.") var int8 = false
    @Flag(help: "With --int8 and the fused pipeline: preprocessing writes the engine's int8 input codes directly.") var codesIn = false
    @Option(help: "Preprocessing: baseline, fused or both.") var pipeline = "both"
    @Option(help: "Preprocessing threads.") var workers = 1
    @Option(help: "Engine instances (one thread each, kernels serial on it).") var instances = 1
    @Option(help: "Largest batch an instance takes from the queue (dynamic batching).") var maxBatch = 1
    @Option(help: "Images to serve per run.") var count = 400
    @Flag(help: "Also time OpenCV's preprocessing on the same files and threads.") var opencv = false

    func validate() throws {
        guard ["baseline", "fused", "both"].contains(pipeline) else { throw ValidationError("--pipeline must be baseline, fused or both, got '\(pipeline)'") }
        guard (1...64).contains(workers) else { throw ValidationError("--workers must be in 1...64, got \(workers)") }
        guard (1...64).contains(instances) else { throw ValidationError("--instances must be in 1...64, got \(instances)") }
        guard (1...64).contains(maxBatch) else { throw ValidationError("--max-batch must be in 1...64, got \(maxBatch)") }
        guard (1...1_000_000).contains(count) else { throw ValidationError("--count must be in 1...1000000, got \(count)") }
        guard !codesIn || (int8 && pipeline != "baseline") else { throw ValidationError("--codes-in needs --int8 and the fused pipeline") }
    }

    func run() throws {
        let (_, saved) = try loadSavedModel(model, missingHint: " (make models trains it)")
        guard case .detector(let detector) = saved else { throw ValidationError("--model: serve-bench serves detectors") }
        let folder = URL(fileURLWithPath: images)
        let files = try readServingImages(folder)
        let size = detector.config.inputSize
        print("\(files.count) images from \(folder.path) (\(files.reduce(0) { $0 + $1.data.count } / files.count / 1024) KiB each on average), input \(size) px; \(Kernels.summary)")
        print(CUDA.shared.notice + (CUDA.shared.isReady ? "; the serving loop still runs on the CPU (nvJPEG and GPU engine nodes in it: not built yet)" : ""))

        var sim: QuantizationSimulator?
        if int8 {
            let train = try DetectionDataset(root: URL(fileURLWithPath: data), split: "train2017")
            sim = try prepareDetectorPTQ(detector, train: train, method: .entropy, calibration: CalibrationPlan(batches: 4, batchSize: 32, seed: 0))
        } else {
            detector.eval()
            detector.convertToDeployForm()
        }
        defer { sim?.remove() }
        let pipelines: [ServingPreprocessor.Pipeline] = pipeline == "both" ? [.baseline, .fused] : [ServingPreprocessor.Pipeline(rawValue: pipeline)!]

        print("\n== preprocessing alone, \(workers) worker(s)")
        var perImage: [ServingPreprocessor.Pipeline: (decode: Double, transform: Double)] = [:]
        for p in pipelines {
            var c = ServingConfig()
            (c.workers, c.instances, c.images, c.codesIn) = (workers, 0, count, codesIn && p == .fused)
            let r = try serve(files: files, preprocessor: ServingPreprocessor(p, size: size), instances: [], config: c)
            perImage[p] = (r.msPerImage.decode, r.msPerImage.transform)
            print(String(format: "%@%@: %.1f img/s (decode %.2f ms + transform %.2f ms per image)%@", p.rawValue, c.codesIn ? " (int8 codes)" : "",
                         r.imagesPerSecond, r.msPerImage.decode, r.msPerImage.transform, r.failed > 0 ? ", \(r.failed) failed" : ""))
        }
        if let floor = jpegDecodeFloor(files: Array(files.prefix(count))).map({ 1000 * $0 }) {
            var line = String(format: "decode floor: %.2f ms per image at 1/8 scale (every Huffman code read, 1x1 inverse DCTs; one core)", floor)
            if let b = perImage[.baseline], let f = perImage[.fused] {
                line += String(format: ": no pipeline on libjpeg-turbo beats %.2fx the baseline's per-image time (fused now %.2fx)",
                               (b.decode + b.transform) / (floor + f.transform), (b.decode + b.transform) / (f.decode + f.transform))
            }
            print(line)
        }
        if opencv {
            guard let peer = OpenCVPeer.locate(), peer.isAvailable else { throw ValidationError("--opencv: no Python with cv2 (make venv installs it)") }
            let r = try peer.run(folder: folder, size: size, images: count, threads: workers)
            print(String(format: "OpenCV %@ (imdecode + resize + copyMakeBorder + normalise): %.1f img/s", r.opencv, r.img_per_s))
        }

        print("\n== served by the \(int8 ? "INT8 plan" : "FP32 graph")")
        let engines = try servingInstances(detector, count: instances, maxBatch: maxBatch)
        for p in pipelines {
            var c = ServingConfig()
            (c.workers, c.instances, c.maxBatch, c.images, c.codesIn) = (workers, instances, maxBatch, count, codesIn && p == .fused)
            let r = try serve(files: files, preprocessor: ServingPreprocessor(p, size: size), instances: engines, config: c, progressLabel: "serve \(p.rawValue)")
            print(r.summary)
        }
    }
}
