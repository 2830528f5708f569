import ArgumentParser
import Foundation
import QuantLab

/// Reads the saved model (safetensors with QuantLab's metadata) that `--model` names. A missing
/// file, or an ONNX file given where a safetensors model is read, is an error that says so
/// before the safetensors parser reports a header it cannot make sense of.
func loadSavedModel(_ path: String, missingHint: String = "") throws -> (url: URL, model: SavedModel) {
    let url = URL(fileURLWithPath: path)
    guard FileManager.default.fileExists(atPath: url.path) else { throw ValidationError("--model: no file at \(url.path)\(missingHint)") }
    if url.pathExtension.lowercased() == "onnx" {
        throw ValidationError("--model reads a saved safetensors model; \(url.path) is an ONNX file (qlab engine runs ONNX with --onnx)")
    }
    return (url, try SavedModel.load(url))
}
