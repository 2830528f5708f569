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
