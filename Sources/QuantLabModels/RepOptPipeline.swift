import Foundation
import QuantLabCore
import QuantLabData

extension Module {
    /// The learned branch scales of every LinearAddBlock (RepOpt stage 1), by block path.
    public func repOptScales() -> [String: RepOptScales] {
        var out: [String: RepOptScales] = [:]
        for (name, b) in repBlocks() { if let l = b as? LinearAddBlock { out[name] = l.scales() } }
        return out
    }

    /// RepOpt stage 2 set-up: re-initialises every RealVGG block from the stage-1 scales found
    /// at the same path and returns the (kernel, gradient mask) pairs for RepOptSGD.
    public func initializeRepOpt(from scales: [String: RepOptScales], rng: inout SeededGenerator) throws -> [(Tensor, Tensor)] {
        var masks: [(Tensor, Tensor)] = []
        for (name, b) in repBlocks() {
            guard let block = b as? RealVGGBlock else { continue }
            guard let s = scales[name] else { throw ModuleError.missingKeys(["\(name) (RepOpt scales)"]) }
            guard s.conv3x3.count == block.outChannels, (s.identity != nil) == (block.inChannels == block.outChannels && block.stride == 1) else {
                throw ModuleError.shapeMismatch(name: "\(name) scales", expected: [block.outChannels], got: [s.conv3x3.count])
            }
            masks.append((block.conv.weight, block.initialize(from: s, rng: &rng)))
        }
        return masks
    }
}
