import Foundation

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
    /// Inside a backward pass that releases each intermediate gradient once it is passed on
    /// (`retainGraph` false): a node's incoming gradient is then read by that node only, and
    /// may become an input's gradient without a copy (`Tensor.adoptOrAccumulateGrad`).
    @TaskLocal static var consumesGradients = false
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
    var name = name
    if OpProfiler.isActive {
        name = OpProfiler.scope + name
        OpProfiler.mark("forward " + name)
    }
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
        OpProfiler.mark("backward: graph walk")
        GradMode.$consumesGradients.withValue(!retainGraph) { withNoGrad {
            for t in order.reversed() {
                guard let node = t.node, let g = t.grad else { continue }
                OpProfiler.backward(node, g)
                if !retainGraph {
                    t.node = nil
                    t.grad = nil // intermediate: its gradient has been passed on
                }
            }
        } }
    }
}

/// dst.grad-style accumulation helper: dst += src (same element count).
@inline(__always)
func ql_axpy_into(_ dst: Tensor, _ src: Tensor) {
    require(dst.count == src.count, "gradient accumulation \(src.shape) into \(dst.shape)")
    ql_axpy(dst.data, 1, src.data, Int64(src.count))
}

import CKernels

/// Where a training step's time goes, op by op (issue #18). Off unless `OpProfiler.measure`
/// runs a body; then every op's forward is charged the time since the previous op or mark
/// (ops compute first and record last, so this is the op's own time plus any Swift work
/// between ops that no `mark` claimed), every backward closure is timed on its own, and
/// callers name other work with `mark` ("loss.assigner", "optimizer.step"). Convolutions are
/// keyed by geometry. Single-threaded use (the training loop's thread); the kernels' worker
/// threads are inside the timed spans. One measurement at a time, process-wide.
public final class OpProfiler: @unchecked Sendable {
    public struct Entry: Sendable {
        public var key: String
        public var seconds: Double
        public var calls: Int

        public init(key: String, seconds: Double, calls: Int) {
            self.key = key
            self.seconds = seconds
            self.calls = calls
        }
    }

    nonisolated(unsafe) private static var enabled = false
    nonisolated(unsafe) private static var owner = pthread_self()
    /// Whether ops on this thread are being profiled (only the thread that called `measure`:
    /// ops of other threads, e.g. tests running alongside, are neither timed nor renamed).
    public static var isActive: Bool { enabled && pthread_equal(owner, pthread_self()) != 0 }
    nonisolated(unsafe) private static var table: [String: (Double, Int)] = [:]
    nonisolated(unsafe) private static var last: UInt64 = 0
    nonisolated(unsafe) private static var inBackward = false
    /// Prefix of the keys of ops recorded now (their backward keeps it): see `scoped`.
    nonisolated(unsafe) public private(set) static var scope = ""

    /// Runs `body` with `prefix` before every op's key (e.g. "loss/"), forward and backward.
    public static func scoped<T>(_ prefix: String, _ body: () throws -> T) rethrows -> T {
        guard isActive else { return try body() }
        let outer = scope
        scope = outer + prefix
        defer { scope = outer }
        return try body()
    }

    @inline(__always) static func now() -> UInt64 { DispatchTime.now().uptimeNanoseconds }

    /// Runs `body` with profiling on; returns its result and the entries, slowest first.
    public static func measure<T>(_ body: () throws -> T) rethrows -> (T, [Entry]) {
        require(!enabled, "OpProfiler.measure: already measuring (on another thread, or nested)")
        table = [:]
        owner = pthread_self()
        enabled = true
        last = now()
        defer { enabled = false }
        let result = try body()
        let entries = table.map { Entry(key: $0.key, seconds: $0.value.0, calls: $0.value.1) }.sorted { $0.seconds > $1.seconds }
        return (result, entries)
    }

    /// Charges the time since the previous op or mark to `key`.
    @inline(__always) public static func mark(_ key: @autoclosure () -> String) {
        guard isActive, !inBackward else { return }
        let t = now()
        add(key(), Double(t - last) * 1e-9)
        last = t
    }

    static func add(_ key: String, _ seconds: Double) {
        let e = table[key] ?? (0, 0)
        table[key] = (e.0 + seconds, e.1 + 1)
    }

    /// Times one backward closure under "backward <name>".
    @inline(__always) static func backward(_ node: GradNode, _ g: Tensor) {
        guard isActive else { node.backward(g); return }
        inBackward = true
        let t0 = now()
        node.backward(g)
        let t1 = now()
        inBackward = false
        add("backward " + node.name, Double(t1 - t0) * 1e-9)
        last = t1
    }
}
