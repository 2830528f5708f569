import ArgumentParser
import Foundation
import QuantLab

struct TrainBaselines: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "models",
        abstract: "Train (or reuse) the FP32 baselines in data/models/: detectors x {repvgg, qarepvgg, repopt}, classifiers x {repvgg, qarepvgg, repopt}.")

    @Flag(help: "Tiny models on tiny data (smoke runs).") var quick = false
    @Option(help: "Where datasets live.") var dataRoot = "data"
    @Option(help: "Where baselines are cached.") var modelsRoot = "data/models"
    @Option(help: "Only these baselines, comma-separated (e.g. det-repopt,cls-repvgg); all six when absent.") var only: String?

    func validate() throws {
        let known = Set(Baselines.detectorBlocks.map { "det-\($0.rawValue)" } + Baselines.classifierBlocks.map { "cls-\($0.rawValue)" })
        for name in selected where !known.contains(name) {
            throw ValidationError("--only: no baseline '\(name)'; the baselines are \(known.sorted().joined(separator: ", "))")
        }
    }

    private var selected: [String] { only.map { $0.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) } } ?? [] }
    private func wanted(_ name: String) -> Bool { only == nil || selected.contains(name) }

    func run() throws {
        let plan = Baselines.Plan(quick: quick, dataRoot: URL(fileURLWithPath: dataRoot), modelsRoot: URL(fileURLWithPath: modelsRoot))
        for b in Baselines.detectorBlocks where wanted("det-\(b.rawValue)") {
            let (_, r, _) = try Baselines.detector(b, plan: plan)
            print(String(format: "det-%@: %d epochs, %.1f min, %.1f img/s", b.rawValue, r.epochs, r.wallSeconds / 60, r.imagesPerSecond))
        }
        for b in Baselines.classifierBlocks where wanted("cls-\(b.rawValue)") {
            let (_, r, _) = try Baselines.classifier(b, plan: plan)
            print(String(format: "cls-%@: %d epochs, %.1f min, %.1f img/s", b.rawValue, r.epochs, r.wallSeconds / 60, r.imagesPerSecond))
        }
    }
}
