import ArgumentParser
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
    @Option(help: "Override the smallest object size (pixels).") var minObjectSize: Double?
    @Option(help: "Override the largest object size (pixels).") var maxObjectSize: Double?
    @Option(help: "Override the dataset name (the folder under --root).") var name: String?

    func validate() throws {
        guard SyntheticShapes.Config.presets[preset] != nil else {
            throw ValidationError("unknown preset '\(preset)'; choose one of \(SyntheticShapes.Config.presets.keys.sorted().joined(separator: ", "))")
        }
        if let n = trainImages, n < 1 { throw ValidationError("--train-images must be positive, got \(n)") }
        if let n = valImages, n < 1 { throw ValidationError("--val-images must be positive, got \(n)") }
        let preset = SyntheticShapes.Config.presets[preset]!
        let (lo, hi) = (minObjectSize ?? preset.minObjectSize, maxObjectSize ?? preset.maxObjectSize)
        guard lo >= 4, hi >= lo, hi <= Double(preset.imageSize) else {
            throw ValidationError("object sizes must satisfy 4 <= --min-object-size <= --max-object-size <= \(preset.imageSize), got \(lo)...\(hi)")
        }
        if let name, name.isEmpty || name.contains("/") || name == "." || name == ".." {
            throw ValidationError("--name must be a plain folder name (no '/', not '.' or '..'), got '\(name)'")
        }
    }

    func run() throws {
        var config = SyntheticShapes.Config.presets[preset]!
        if let seed { config.seed = seed; config.name += "-seed\(seed)" }
        if let trainImages { config.trainImages = trainImages }
        if let valImages { config.valImages = valImages }
        if let minObjectSize { config.minObjectSize = minObjectSize }
        if let maxObjectSize { config.maxObjectSize = maxObjectSize }
        if let name { config.name = name }
        let progress = Progress(total: config.trainImages + config.valImages, label: "make-data \(config.name)", unit: "img")
        let dir = try SyntheticShapes(config).write(root: URL(fileURLWithPath: root), threads: Kernels.threads) { done, _ in
            progress.update(done)
        }
        progress.finish()
        print("\(dir.path): \(config.trainImages) train + \(config.valImages) val images, \(config.imageHeight.map { "\(config.imageSize)x\($0)" } ?? "\(config.imageSize)") px, \(SyntheticShapes.classNames.count) classes")
    }
}
