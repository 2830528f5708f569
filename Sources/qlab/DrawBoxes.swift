import ArgumentParser
import Foundation
import QuantLab

struct DrawBoxes: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "draw",
        abstract: "Draw ground truth (solid) and detections (dashed) on images, as one grid JPEG.")

    @Option(help: "Dataset folder in COCO layout (contains annotations/).") var data: String
    @Option(help: "Split: train2017 or val2017.") var split = "val2017"
    @Option(help: "Detections JSON to overlay (optional).") var dt: String?
    @Option(help: "How many images (the first ones by id).") var count = 16
    @Option(help: "Grid columns.") var columns = 4
    @Option(help: "Minimum score of drawn detections.") var minScore = 0.3
    @Option(help: "Output JPEG.") var out = "boxes.jpg"

    func validate() throws {
        guard (1...1000).contains(count) else { throw ValidationError("--count must be in 1...1000, got \(count)") }
        guard (1...64).contains(columns) else { throw ValidationError("--columns must be in 1...64, got \(columns)") }
        guard minScore.isFinite, (0...1).contains(minScore) else { throw ValidationError("--min-score must be in [0, 1], got \(minScore)") }
    }

    func run() throws {
        let root = URL(fileURLWithPath: data)
        let name = split.replacingOccurrences(of: "2017", with: "")
        let gt = try COCODataset.load(root.appendingPathComponent("annotations/instances_\(name)2017.json"))
        let classIndex = Dictionary(uniqueKeysWithValues: gt.categoryIds.enumerated().map { ($0.element, $0.offset) })
        let byImage = gt.annotationsByImage()
        let dets = try dt.map { try COCOResult.load(URL(fileURLWithPath: $0)) } ?? []
        let detsByImage = Dictionary(grouping: dets, by: \.image_id)
        var tiles: [RGBImage] = []
        for im in gt.images.sorted(by: { $0.id < $1.id }).prefix(count) {
            let image = try JPEG.read(root.appendingPathComponent(split).appendingPathComponent(im.file_name))
            let truth = (byImage[im.id] ?? []).map { (Box(xywh: $0.bbox), classIndex[$0.category_id]!) }
            let predicted = (detsByImage[im.id] ?? []).map { Detection(box: Box(xywh: $0.bbox), classIndex: classIndex[$0.category_id] ?? 0, score: $0.score) }
            tiles.append(Draw.overlay(image, groundTruth: truth, detections: predicted, minScore: minScore))
        }
        guard !tiles.isEmpty else { throw ValidationError("no images in \(split)") }
        if tiles.contains(where: { $0.width != tiles[0].width || $0.height != tiles[0].height }) {
            tiles = tiles.map { $0.resized(width: tiles[0].width, height: tiles[0].height) }
        }
        try JPEG.write(Draw.grid(tiles, columns: columns), to: URL(fileURLWithPath: out), quality: 92)
        print("wrote \(out) (\(tiles.count) images)")
    }
}
