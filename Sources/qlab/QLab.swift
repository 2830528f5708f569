import ArgumentParser
import Foundation
import QuantLab

@main
struct QLab: ParsableCommand {
    /// Line-buffered stdout, so progress and results reach a log file as they happen.
    static func main() {
        lineBufferStandardOutput()
        main(nil)
    }

    static let configuration = CommandConfiguration(
        commandName: "qlab",
        abstract: "QuantLab: INT8 quantization of object detectors, reproduced from scratch.",
        subcommands: [Info.self, Demo.self, Bench.self, MakeData.self, Train.self, TrainClassifier.self, TrainBaselines.self, EvalCOCO.self, DrawBoxes.self, Analyze.self, SensitivityCommand.self, HistogramAmax.self, PTQCommand.self, QATCommand.self, EngineCommand.self, ServeBench.self]
    )
}

struct Info: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Show the CPU kernel level and thread count in use.")

    func run() {
        print("cpu: \(Kernels.cpuName), \(ProcessInfo.processInfo.activeProcessorCount) cores")
        let levels = Kernels.ISA.allCases.map { "\($0)=\($0.isSupported ? "yes" : "no")" }
        print("kernels: \(Kernels.isa) (supported: \(levels.joined(separator: ", ")); QL_ISA to cap)")
        print("threads: \(Kernels.threads) (QL_NUM_THREADS to change)")
        do { if let peak = try Kernels.peakRates() { print(peak.summary) } } catch { print("peak probe failed: \(error)") }
        print(CUDA.shared.notice)
    }
}

struct Demo: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Train a small conv net on the built-in toy shapes task and report held-out accuracy.")

    @Option(help: "Training steps (batch 32).") var steps = 300
    @Option(help: "Random seed; the run is fully determined by it.") var seed: UInt64 = 0

    func validate() throws {
        guard steps >= 10 else { throw ValidationError("--steps must be at least 10, got \(steps)") }
    }

    func run() {
        var rng = SeededGenerator(seed: seed)
        let model = ToyShapes.model(rng: &rng)
        print("toy shapes: 4 classes (\(ToyShapes.classNames.joined(separator: ", "))), 12x12 images, \(model.parameterCount) parameters, seed \(seed)")
        let start = Date()
        let total = steps
        let report = ToyShapes.train(model, steps: total, rng: &rng) { step, loss in
            if step % max(total / 10, 1) == 0 || step == total - 1 {
                let elapsed = Date().timeIntervalSince(start)
                let rate = Double((step + 1) * 32) / max(elapsed, 1e-9)
                print(String(format: "step %4d/%d  loss %.4f  %.0f img/s", step + 1, total, loss, rate))
            }
        }
        print(String(format: "loss %.3f -> %.3f, held-out accuracy %.1f%% (chance 25%%), %.1f s",
                     report.firstLoss, report.lastLoss, 100 * report.accuracy, Date().timeIntervalSince(start)))
    }
}

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Kernel benchmarks, reported as ratios measured in one run.",
        discussion: "SGEMM against numpy's OpenBLAS (same threads), INT8 GEMM against our SGEMM, the INT8 conv's direct kernel against im2col + GEMM, conv2d against our SGEMM rate.")

    @Flag(help: "Fewer sizes and rounds (a smoke run).") var quick = false
    @Flag(help: "Only the engine: FP32 graph vs INT8 plan on the full-size detector, batch 1 and 32.") var engine = false
    @Flag(help: "Only the GPU: our CUDA SGEMM and INT8 GEMM against cuBLAS on the same device (needs make cuda and a GPU).") var gpu = false
    @Flag(help: "Only detector training and inference against PyTorch on the same model, weights, batch and threads (make bench-torch).") var torch = false
    @Option(help: "With --torch: the Python with PyTorch and safetensors.") var torchPython = ".venv-torch/bin/python"
    @Option(help: "Rep block of the --torch and --profile detector (repvgg, qarepvgg, repopt).") var block = "repvgg"
    @Flag(help: "Only where our detector training step's time goes, op by op (convolutions by geometry).") var profile = false
    @Option(help: "With --gpu or --torch: also write the measurements as JSON here.") var json: String?
    @Option(help: "Python with numpy for the OpenBLAS comparison.") var python = "python3"

    func run() throws {
        if gpu {
            var bench = GPUBenchmarks()
            bench.quick = quick
            let (rows, summary) = try bench.run()
            print("\nsummary")
            for line in summary { print(line) }
            if let json {
                let encoder = JSONEncoder()
                encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
                try AtomicFile.write(try encoder.encode(rows), to: URL(fileURLWithPath: json))
            }
            return
        }
        if torch || profile {
            guard let kind = BlockKind(rawValue: block), kind != .repoptSearch else {
                throw ValidationError("--block must be repvgg, qarepvgg or repopt, got \(block)")
            }
            var bench = TrainingBenchmark()
            bench.block = kind
            if profile {
                let entries = bench.profile(steps: quick ? 1 : 3)
                let total = entries.reduce(0) { $0 + $1.seconds }
                print(String(format: "one training step (%@, batch %d, %d px, %@): %.3f s profiled", block, bench.batch, bench.inputSize, Kernels.summary, total))
                print("by kind of work:")
                for (kind, s) in TrainingBenchmark.breakdown(entries) where s / total >= 0.002 {
                    print(String(format: "  %6.1f ms  %5.1f%%  %@", 1e3 * s, 100 * s / total, kind))
                }
                print("slowest keys:")
                for e in entries.prefix(30) { print(String(format: "  %6.1f ms  %5.1f%%  x%-3d %@", 1e3 * e.seconds, 100 * e.seconds / total, e.calls, e.key)) }
                return
            }
            if quick { (bench.steps, bench.warmup, bench.rounds) = (3, 1, 1) }
            let report = try bench.runAgainstTorch(python: torchPython)
            print("\nsummary")
            for line in TrainingBenchmark.summary(report) { print(line) }
            if let json {
                let encoder = JSONEncoder()
                encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
                try AtomicFile.write(try encoder.encode(report), to: URL(fileURLWithPath: json))
            }
            return
        }
        if engine {
            var bench = EngineBenchmark()
            bench.quick = quick
            let summary = try bench.run()
            print("\nsummary")
            for line in summary { print(line) }
            return
        }
        var bench = KernelBenchmarks()
        bench.quick = quick
        bench.pythonPath = python
        let summary = bench.run()
        print("\nsummary")
        for line in summary { print(line) }
    }
}
