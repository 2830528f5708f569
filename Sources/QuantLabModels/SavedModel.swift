import Foundation
import QuantLabCore
import QuantLabData

/// A model file that cannot be loaded: the message names the file and what is wrong.
public struct ModelFileError: Error, CustomStringConvertible, Equatable {
    public let description: String
    public init(_ message: String) { description = message }
}

/// A configuration field checked before a model is built: throws "'field' is value, expected
/// range" when `ok` is false (the model configurations' `validate()`).
func checkField(_ ok: Bool, _ field: String, _ value: Any, _ range: String) throws {
    if !ok { throw ModelFileError("'\(field)' is \(value), expected \(range)") }
}

/// A trained model read back from a safetensors file, whatever its kind. The file says what
/// it holds in its metadata (`model`: "yolov6" or "rep_classifier", `config`: the
/// architecture as JSON); files written before that convention are read with the
/// `train.json` that `Baselines` keeps beside them.
public enum SavedModel {
    case detector(YOLOv6)
    case classifier(RepClassifier)
    case rtdetr(RTDETR)

    public var module: Module {
        switch self {
        case .detector(let m): return m
        case .classifier(let m): return m
        case .rtdetr(let m): return m
        }
    }

    public var kindName: String {
        switch self {
        case .detector(let m): return "YOLOv6 detector (\(m.config.block.rawValue), input \(m.config.inputSize))"
        case .classifier(let m): return "RepVGG-style classifier (\(m.config.block.rawValue), input \(m.config.inputSize))"
        case .rtdetr(let m): return "RT-DETR-lite (hidden \(m.config.hidden), \(m.config.decoderLayers) decoder layers, \(m.config.queries) queries, input \(m.config.inputSize))"
        }
    }

    /// Metadata that makes a saved file self-describing.
    public static func metadata(for model: YOLOv6) -> [String: String] {
        ["model": "yolov6", "config": Baselines.json(model.config), "block": model.config.block.rawValue]
    }

    public static func metadata(for model: RepClassifier) -> [String: String] {
        ["model": "rep_classifier", "config": Baselines.json(model.config), "block": model.config.block.rawValue]
    }

    public static func metadata(for model: RTDETR) -> [String: String] {
        ["model": "rtdetr", "config": Baselines.json(model.config), "block": model.config.block.rawValue]
    }

    /// Loads `url` (a model.safetensors); errors name the file and what is missing.
    public static func load(_ url: URL) throws -> SavedModel {
        let (tensors, metadata) = try SafeTensors.load(from: url)
        var kind = metadata["model"], configJSON = metadata["config"]
        if configJSON == nil {
            let record = url.deletingLastPathComponent().appendingPathComponent("train.json")
            guard let data = try? Data(contentsOf: record),
                  let saved = try? JSONDecoder().decode(Baselines.TrainingRecord.self, from: data) else {
                throw ModelFileError("\(url.path): no architecture in its metadata (keys 'model', 'config') and no readable train.json beside it")
            }
            configJSON = saved.modelConfig
            kind = url.deletingLastPathComponent().lastPathComponent.hasPrefix("cls-") ? "rep_classifier" : "yolov6"
        }
        let data = Data((configJSON ?? "").utf8)
        var rng = SeededGenerator(seed: 0) // every weight is overwritten from the file
        let model: SavedModel
        switch kind {
        case "yolov6":
            guard let cfg = try? JSONDecoder().decode(YOLOv6Config.self, from: data) else { throw ModelFileError("\(url.path): 'config' is not a YOLOv6 configuration") }
            do { try cfg.validate() } catch { throw ModelFileError("\(url.path): metadata 'config': \(error)") }
            model = .detector(YOLOv6(cfg, rng: &rng))
        case "rep_classifier":
            guard let cfg = try? JSONDecoder().decode(RepClassifier.Config.self, from: data) else { throw ModelFileError("\(url.path): 'config' is not a classifier configuration") }
            do { try cfg.validate() } catch { throw ModelFileError("\(url.path): metadata 'config': \(error)") }
            model = .classifier(RepClassifier(cfg, rng: &rng))
        case "rtdetr":
            guard let cfg = try? JSONDecoder().decode(RTDETRConfig.self, from: data) else { throw ModelFileError("\(url.path): 'config' is not an RT-DETR configuration") }
            do { try cfg.validate() } catch { throw ModelFileError("\(url.path): metadata 'config': \(error)") }
            model = .rtdetr(RTDETR(cfg, rng: &rng))
        default:
            throw ModelFileError("\(url.path): unknown model kind '\(kind ?? "")' (expected yolov6, rep_classifier or rtdetr)")
        }
        do { try model.module.loadStateDict(tensors) } catch { throw ModelFileError("\(url.path): \(error)") }
        model.module.eval()
        return model
    }
}
