import ArgumentParser
import CKernels
import Foundation
import QuantLab

struct MakeData: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "make-data",
        abstract: "Generate a synthetic dataset in COCO layout (deterministic: same seed, same bytes).",
        discussion: "Presets: \(SyntheticShapes.Config.presets.keys.sorted().joined(separator: ", ")). Existing complete copies are kept.")

    @Option(help: "Dataset preset.") var preset = "shapes"
    @Option(help: "Folder that receives <name>/.") var root = "data"
    @Option(help: "Seed (changes every image).") var seed: UInt64?
    @Option(help: "Override the number of training images.") var trainImages: Int?
    @Option(help: "Override the number of validation images.") var valImages: Int?

    func validate() throws {
        guard SyntheticShapes.Config.presets[preset] != nil else {
            throw ValidationError("unknown preset '\(preset)'; choose one of \(SyntheticShapes.Config.presets.keys.sorted().joined(separator: ", "))")
        }
        if let n = trainImages, n < 1 { throw ValidationError("--train-images must be positive, got \(n)") }
        if let n = valImages, n < 1 { throw ValidationError("--val-images must be positive, got \(n)") }
    }

    func run() throws {
        var config = SyntheticShapes.Config.presets[preset]!
        if let seed { config.seed = seed; config.name += "-seed\(seed)" }
        if let trainImages { config.trainImages = trainImages }
        if let valImages { config.valImages = valImages }
        let progress = Progress(total: config.trainImages + config.valImages, label: "make-data \(config.name)", unit: "img")
        let dir = try SyntheticShapes(config).write(root: URL(fileURLWithPath: root), threads: Int(ql_get_num_threads())) { done, _ in
            progress.update(done)
        }
        progress.finish()
        print("\(dir.path): \(config.trainImages) train + \(config.valImages) val images, \(config.imageSize) px, \(SyntheticShapes.classNames.count) classes")
    }
}
