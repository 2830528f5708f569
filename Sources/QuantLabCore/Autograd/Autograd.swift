/// One recorded op: its inputs in order and a closure that, given the gradient of the op's
/// output, ADDS each input's gradient into that input's `grad` (only for inputs that
/// require it). Accumulation (`+=`) is what makes a tensor used twice get both contributions.
public final class GradNode {
    public let name: String
    public let parents: [Tensor]
    let backward: (Tensor) -> Void

    init(name: String, parents: [Tensor], backward: @escaping (Tensor) -> Void) {
        self.name = name
        self.parents = parents
        self.backward = backward
    }
}

/// Whether ops record a graph. Off inside `withNoGrad { ... }` (evaluation, calibration,
/// optimizer updates), where no node is built and no memory is kept for a backward pass.
public enum GradMode {
    @TaskLocal public static var isEnabled = true
}

@discardableResult
public func withNoGrad<T>(_ body: () throws -> T) rethrows -> T {
    try GradMode.$isEnabled.withValue(false, operation: body)
}

/// Attaches a node to `out` when grad mode is on and any parent requires a gradient. This is
/// how a differentiable op is defined, here and in the layers above (fake quantization):
/// compute `out`, then record a backward that ADDS into each parent's `gradBuffer()`.
@inline(__always)
public func record(_ out: Tensor, _ name: String, _ parents: [Tensor], _ backward: @escaping (Tensor) -> Void) -> Tensor {
    if GradMode.isEnabled && parents.contains(where: { $0.requiresGrad }) {
        out.requiresGrad = true
        out.node = GradNode(name: name, parents: parents, backward: backward)
    }
    return out
}

extension Tensor {
    /// Back-propagates from this tensor. Without `gradient`, the tensor must hold one element
    /// and its gradient is 1. Gradients accumulate into `grad` of every tensor that requires
    /// one; intermediate gradients and the graph are released afterwards unless
    /// `retainGraph` is set (then `backward` may be called again on the same graph).
    public func backward(gradient: Tensor? = nil, retainGraph: Bool = false) {
        require(requiresGrad, "backward() on a tensor that does not require grad")
        let seed: Tensor
        if let g = gradient {
            require(g.shape == shape, "backward gradient shape \(g.shape) != tensor shape \(shape)")
            seed = g
        } else {
            require(count == 1, "backward() without a gradient needs a one-element tensor, got shape \(shape)")
            seed = Tensor.full(shape, 1)
        }
        ql_axpy_into(gradBuffer(), seed)

        // Reverse topological order by an iterative depth-first search (deep nets would
        // overflow the stack with recursion).
        var order: [Tensor] = []
        var visited = Set<ObjectIdentifier>()
        var stack: [(Tensor, Bool)] = [(self, false)]
        while let (t, expanded) = stack.popLast() {
            if expanded { order.append(t); continue }
            if visited.contains(ObjectIdentifier(t)) { continue }
            visited.insert(ObjectIdentifier(t))
            stack.append((t, true))
            if let node = t.node {
                for p in node.parents where p.requiresGrad && !visited.contains(ObjectIdentifier(p)) {
                    stack.append((p, false))
                }
            }
        }
        withNoGrad {
            for t in order.reversed() {
                guard let node = t.node, let g = t.grad else { continue }
                node.backward(g)
                if !retainGraph {
                    t.node = nil
                    t.grad = nil // intermediate: its gradient has been passed on
                }
            }
        }
    }
}

/// dst.grad-style accumulation helper: dst += src (same element count).
@inline(__always)
func ql_axpy_into(_ dst: Tensor, _ src: Tensor) {
    require(dst.count == src.count, "gradient accumulation \(src.shape) into \(dst.shape)")
    ql_axpy(dst.data, 1, src.data, Int64(src.count))
}

import CKernels
