import CKernels
import Foundation

/// Errors from loading weights into a module: they name the parameter and both shapes.
public enum ModuleError: Error, CustomStringConvertible, Equatable {
    case missingKeys([String])
    case unexpectedKeys([String])
    case shapeMismatch(name: String, expected: [Int], got: [Int])
    case hooksInUse(layer: String, owner: String, requestedBy: String)

    public var description: String {
        switch self {
        case .missingKeys(let k): return "state dict is missing \(k.count) key(s): \(k.prefix(10).joined(separator: ", "))"
        case .unexpectedKeys(let k): return "state dict has \(k.count) unexpected key(s): \(k.prefix(10).joined(separator: ", "))"
        case .shapeMismatch(let n, let e, let g): return "parameter \(n): model expects shape \(e), state dict has \(g)"
        case .hooksInUse(let l, let o, let r):
            return "layer \(l): its hooks are held by \(o), so \(r) cannot install its own (remove the \(o) first)"
        }
    }
}

/// A layer or model with named parameters, buffers and child modules.
///
/// Names are dotted paths built from registration names, as in PyTorch:
/// `backbone.stem.conv.weight`. A state dict is the ordered list of (name, tensor) of all
/// parameters and buffers; loading one copies values into the existing tensors, so
/// references held elsewhere (an optimizer, say) stay valid.
open class Module {
    public private(set) var isTraining = true
    private var parameterSlots: [(String, Tensor)] = []
    private var bufferSlots: [(String, Tensor)] = []
    private var childSlots: [(String, Module)] = []

    public init() {}

    /// Registers a trainable tensor (sets `requiresGrad`) under `name` and returns it.
    @discardableResult
    public func registerParameter(_ name: String, _ tensor: Tensor) -> Tensor {
        require(!name.contains(".") && !parameterSlots.contains { $0.0 == name }, "bad or duplicate parameter name \(name)")
        tensor.requiresGrad = true
        parameterSlots.append((name, tensor))
        return tensor
    }

    /// Registers a non-trainable state tensor (running statistics, counters).
    @discardableResult
    public func registerBuffer(_ name: String, _ tensor: Tensor) -> Tensor {
        require(!name.contains(".") && !bufferSlots.contains { $0.0 == name }, "bad or duplicate buffer name \(name)")
        bufferSlots.append((name, tensor))
        return tensor
    }

    @discardableResult
    public func registerModule<M: Module>(_ name: String, _ module: M) -> M {
        require(!name.contains(".") && !childSlots.contains { $0.0 == name }, "bad or duplicate module name \(name)")
        childSlots.append((name, module))
        return module
    }

    /// Removes a child (used when a block switches to its deploy form).
    public func unregisterModule(_ name: String) {
        childSlots.removeAll { $0.0 == name }
    }

    public var children: [(String, Module)] { childSlots }

    /// Every module below and including this one, with its dotted path ("" for self).
    public func namedModules(prefix: String = "") -> [(String, Module)] {
        var out: [(String, Module)] = [(prefix, self)]
        for (name, child) in childSlots {
            out += child.namedModules(prefix: prefix.isEmpty ? name : "\(prefix).\(name)")
        }
        return out
    }

    public func namedParameters(prefix: String = "") -> [(String, Tensor)] {
        namedModules(prefix: prefix).flatMap { path, m in
            m.parameterSlots.map { (path.isEmpty ? $0.0 : "\(path).\($0.0)", $0.1) }
        }
    }

    public func namedBuffers(prefix: String = "") -> [(String, Tensor)] {
        namedModules(prefix: prefix).flatMap { path, m in
            m.bufferSlots.map { (path.isEmpty ? $0.0 : "\(path).\($0.0)", $0.1) }
        }
    }

    public var parameters: [Tensor] { namedParameters().map(\.1) }

    /// Parameters then buffers, in registration order.
    public func stateDict() -> [(String, Tensor)] { namedParameters() + namedBuffers() }

    /// Copies values from `state` into this module's tensors. With `strict`, missing and
    /// unexpected keys are errors; a shape mismatch always is. Nothing is written unless the
    /// whole state dict checks out.
    public func loadStateDict(_ state: [String: Tensor], strict: Bool = true) throws {
        let own = stateDict()
        let ownNames = Set(own.map(\.0))
        if strict {
            let missing = own.map(\.0).filter { state[$0] == nil }
            if !missing.isEmpty { throw ModuleError.missingKeys(missing) }
            let unexpected = state.keys.filter { !ownNames.contains($0) }.sorted()
            if !unexpected.isEmpty { throw ModuleError.unexpectedKeys(unexpected) }
        }
        for (name, t) in own {
            if let src = state[name], src.shape != t.shape {
                throw ModuleError.shapeMismatch(name: name, expected: t.shape, got: src.shape)
            }
        }
        for (name, t) in own {
            if let src = state[name] { try t.copyValues(from: src) }
        }
    }

    /// Training mode (batch statistics in BN) or evaluation mode, for this module and below.
    public func train(_ on: Bool = true) {
        for (_, m) in namedModules() { m.isTraining = on }
    }

    public func eval() { train(false) }

    public func zeroGrad() { for p in parameters { p.zeroGrad() } }

    public var parameterCount: Int { parameters.reduce(0) { $0 + $1.count } }
}

/// A module with one input and one output.
public protocol Layer: Module {
    func callAsFunction(_ x: Tensor) -> Tensor
}

/// Children applied in order; registered as "0", "1", ... as in PyTorch.
public final class Sequential: Module, Layer {
    public let layers: [any Layer]

    public init(_ layers: [any Layer]) {
        self.layers = layers
        super.init()
        for (i, l) in layers.enumerated() { registerModule(String(i), l) }
    }

    public func callAsFunction(_ x: Tensor) -> Tensor {
        layers.reduce(x) { $1($0) }
    }
}

extension Module {
    /// The first parameter or buffer holding a NaN or an infinity, with the index of that
    /// value, or nil when all are finite. Training stops on it and evaluation refuses it: a
    /// model with non-finite weights gives numbers that mean nothing (an mAP of 0, say).
    public func firstNonFiniteValue() -> (name: String, index: Int)? {
        for (name, t) in stateDict() {
            let i = ql_first_nonfinite(t.data, Int64(t.count))
            if i >= 0 { return (name, Int(i)) }
        }
        return nil
    }
}

/// A model whose weights are not all finite.
public struct NonFiniteError: Error, CustomStringConvertible, Equatable {
    public let description: String
    public init(_ message: String) { description = message }
}
