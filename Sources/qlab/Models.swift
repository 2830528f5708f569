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

    func run() throws {
        let plan = Baselines.Plan(quick: quick, dataRoot: URL(fileURLWithPath: dataRoot), modelsRoot: URL(fileURLWithPath: modelsRoot))
        for b in Baselines.detectorBlocks {
            let (_, r, _) = try Baselines.detector(b, plan: plan)
            print(String(format: "det-%@: %d epochs, %.1f min, %.1f img/s", b.rawValue, r.epochs, r.wallSeconds / 60, r.imagesPerSecond))
        }
        for b in Baselines.classifierBlocks {
            let (_, r, _) = try Baselines.classifier(b, plan: plan)
            print(String(format: "cls-%@: %d epochs, %.1f min, %.1f img/s", b.rawValue, r.epochs, r.wallSeconds / 60, r.imagesPerSecond))
        }
    }
}
