import ArgumentParser
import Foundation
import QuantLab

struct EvalCOCO: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "eval-coco",
        abstract: "COCO box mAP of a detections file against an annotations file (pycocotools semantics).",
        discussion: "Prints the 12 standard numbers in pycocotools' layout. --json also writes them as {\"stats\": [...]}.")

    @Option(help: "Ground truth, instances_*.json.") var gt: String
    @Option(help: "Detections: [{image_id, category_id, bbox: [x, y, w, h], score}].") var dt: String
    @Option(help: "Also write the numbers to this JSON file.") var json: String?

    func run() throws {
        let truth = try COCODataset.load(URL(fileURLWithPath: gt))
        let detections = try COCOResult.load(URL(fileURLWithPath: dt))
        let result: COCOEvaluator.Result
        do { result = try COCOEvaluator().evaluate(groundTruth: truth, detections: detections) } catch let e as COCOFormatError {
            throw COCOFormatError("\(dt) against \(gt): \(e.description)") // the evaluator knows entries, not files
        }
        print(result.summary)
        if let json {
            let payload: [String: Any] = ["stats": result.stats, "gt": gt, "dt": dt]
            try AtomicFile.write(JSONSerialization.data(withJSONObject: payload, options: [.sortedKeys]), to: URL(fileURLWithPath: json))
        }
    }
}
