import Foundation

extension Module {
    /// Saves parameters and buffers as safetensors (float32), with string metadata.
    public func save(to url: URL, metadata: [String: String] = [:]) throws {
        try SafeTensors.save(stateDict(), metadata: metadata, to: url)
    }

    /// Loads a safetensors checkpoint; see `loadStateDict` for `strict`. Returns the metadata.
    @discardableResult
    public func load(from url: URL, strict: Bool = true) throws -> [String: String] {
        let (tensors, metadata) = try SafeTensors.load(from: url)
        do { try loadStateDict(tensors, strict: strict) } catch {
            throw SafeTensorsError("\(url.path): \(error)")
        }
        return metadata
    }
}

/// A training checkpoint that cannot be read or resumed: the message names the file.
public struct CheckpointError: Error, CustomStringConvertible, Equatable {
    public let description: String
    public init(_ message: String) { description = message }
}

/// "annotations[3].bbox: missing field" from a DecodingError's coding path.
public func describe(_ error: DecodingError) -> String {
    func path(_ keys: [CodingKey]) -> String {
        keys.reduce("") { s, k in
            if let i = k.intValue { return "\(s)[\(i)]" }
            return s.isEmpty ? k.stringValue : "\(s).\(k.stringValue)"
        }
    }
    func path(_ keys: [CodingKey], orTop: Bool) -> String { keys.isEmpty ? "the top level" : "field " + path(keys) }
    switch error {
    case .keyNotFound(let key, let ctx):
        let at = path(ctx.codingPath)
        return "missing field \(at.isEmpty ? "" : at + ".")\(key.stringValue)"
    case .typeMismatch(let type, let ctx):
        return "\(path(ctx.codingPath, orTop: true)) has the wrong type (expected \(type))"
    case .valueNotFound(let type, let ctx):
        return "\(path(ctx.codingPath, orTop: true)) is null (expected \(type))"
    case .dataCorrupted(let ctx):
        let at = path(ctx.codingPath)
        return at.isEmpty ? "not valid JSON (\(ctx.debugDescription))" : "field \(at): \(ctx.debugDescription)"
    @unknown default:
        return "\(error)"
    }
}
