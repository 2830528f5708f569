import Foundation
import CKernels

/// Errors thrown by tensor construction and shape checks. Messages name the offending shape.
public enum TensorError: Error, CustomStringConvertible, Equatable {
    case shapeMismatch(String)
    case invalidArgument(String)
    case kernelFailed(String, Int32)

    public var description: String {
        switch self {
        case .shapeMismatch(let s): return "shape mismatch: \(s)"
        case .invalidArgument(let s): return "invalid argument: \(s)"
        case .kernelFailed(let name, let code): return "kernel \(name) failed with status \(code)"
        }
    }
}

/// A float32 buffer: 64-byte aligned host memory, or device memory of the CUDA plugin.
/// Reference type: a reshaped tensor shares it.
public final class Storage {
    public let count: Int
    public let device: Device
    /// Host memory (cpu) or a device address (cuda): only kernels of that device may use it.
    let address: UnsafeMutablePointer<Float>
    private let deviceBuffer: CUDABuffer<Float>?

    public convenience init(count: Int) { self.init(count: count, zeroed: true) }

    /// `zeroed: false` leaves the values unset: only for an op's output that its kernel then
    /// writes in full (a memory pass saved per op, issue #18).
    init(count: Int, zeroed: Bool) {
        require(count >= 0, "negative storage size \(count)")
        self.count = count
        device = .cpu
        deviceBuffer = nil
        let raw = UnsafeMutableRawPointer.allocate(byteCount: max(count, 1) * 4, alignment: 64)
        address = raw.bindMemory(to: Float.self, capacity: max(count, 1))
        if zeroed { address.initialize(repeating: 0, count: max(count, 1)) }
    }

    /// Zero-filled device memory; throws when there is no CUDA device.
    public convenience init(cudaCount count: Int) throws { try self.init(cudaCount: count, zeroed: true) }

    /// Device memory from `DeviceMemoryPool` (`zeroed: false`: for an op's output that its
    /// kernel writes in full, as on the CPU).
    package init(cudaCount count: Int, zeroed: Bool) throws {
        let buffer = try DeviceMemoryPool.shared.take(count)
        if zeroed { try CUDA.shared.check(CUDA.shared.requireDevice().memset(buffer.pointer, 0, max(count, 1) * 4, nil), "memset") }
        self.count = count
        device = .cuda
        deviceBuffer = buffer
        address = buffer.typed
    }

    /// Host pointer; a device storage has none (copy it with `Tensor.to(.cpu)`).
    public var pointer: UnsafeMutablePointer<Float> {
        require(device == .cpu, "this tensor lives on \(device): copy it with .to(.cpu) before reading it on the host")
        return address
    }

    deinit {
        if device == .cpu { address.deallocate() } else if let deviceBuffer { DeviceMemoryPool.shared.give(deviceBuffer) }
    }
}

/// A contiguous row-major float32 tensor (NCHW for images) that can take part in autograd.
///
/// Every op returns a new contiguous tensor; `reshaped` shares storage. If any input has
/// `requiresGrad`, the result records a `GradNode` (its parents, in order, and a backward
/// closure) so that `backward()` can walk the graph in reverse topological order and
/// accumulate (`+=`) gradients into every tensor that requires them.
public final class Tensor {
    public let shape: [Int]
    public let storage: Storage
    public var requiresGrad: Bool
    /// Accumulated gradient, same shape; allocated on first accumulation.
    public var grad: Tensor?
    /// The op that produced this tensor, or nil for leaves and tensors outside a graph.
    public internal(set) var node: GradNode?

    public var count: Int { storage.count }
    public var rank: Int { shape.count }
    public var device: Device { storage.device }
    /// Host data of a CPU tensor (stops with a clear message for a CUDA tensor).
    public var data: UnsafeMutablePointer<Float> { storage.pointer }
    /// Device address of a CUDA tensor, for the plugin's kernels.
    package var deviceData: UnsafeMutablePointer<Float> {
        require(device == .cuda, "deviceData of a \(device) tensor")
        return storage.address
    }
    public var isLeaf: Bool { node == nil }

    public init(shape: [Int], storage: Storage, requiresGrad: Bool = false) {
        require(shape.allSatisfy { $0 >= 0 }, "negative dimension in shape \(shape)")
        require(shape.reduce(1, *) == storage.count, "shape \(shape) does not match storage of \(storage.count)")
        self.shape = shape
        self.storage = storage
        self.requiresGrad = requiresGrad
    }

    /// Zero-filled tensor.
    public convenience init(zeros shape: [Int], requiresGrad: Bool = false) {
        self.init(shape: shape, storage: Storage(count: shape.reduce(1, *)), requiresGrad: requiresGrad)
    }

    /// A tensor whose values are not set: for an op's output that its kernel writes in full
    /// (the package's engine included).
    package convenience init(uninitialized shape: [Int]) {
        self.init(shape: shape, storage: Storage(count: shape.reduce(1, *), zeroed: false))
    }

    /// Adds `g` (same element count) into this tensor's gradient; the first contribution is
    /// copied in, not added to zeros (a memory pass fewer for the common single-use tensor).
    /// `accumulateGrad`, except that a first gradient takes `g`'s buffer itself instead of a
    /// copy when the running backward pass consumes gradients (GradMode.consumesGradients):
    /// for `g` the incoming gradient of the node being processed, which nothing reads after
    /// that node (its tensor's gradient is released). Give it to one input only: two inputs
    /// adopting one buffer would add into each other's gradients.
    func adoptOrAccumulateGrad(_ g: Tensor) {
        if grad == nil && GradMode.consumesGradients && g.shape == shape && g.device == device {
            grad = g
        } else {
            accumulateGrad(g)
        }
    }

    func accumulateGrad(_ g: Tensor) {
        require(g.count == count, "gradient accumulation \(g.shape) into \(shape)")
        if let existing = grad {
            ql_axpy(existing.data, 1, g.data, Int64(count))
        } else {
            let fresh = Tensor(uninitialized: shape)
            fresh.data.update(from: g.data, count: count)
            grad = fresh
        }
    }

    /// Tensor from values the code itself computed, in row-major order. A count that does not
    /// match the shape is a bug in the caller, so it stops with a message naming both (use
    /// `init(shape:values:)`, which throws, for values from outside).
    public convenience init(_ values: [Float], shape: [Int]) {
        require(shape.allSatisfy { $0 >= 0 } && shape.reduce(1, *) == values.count,
                     "Tensor(_:shape:): \(values.count) values for shape \(shape)")
        self.init(zeros: shape)
        values.withUnsafeBufferPointer { src in
            if let base = src.baseAddress { data.update(from: base, count: values.count) }
        }
    }

    /// Tensor from values in row-major order; throws if the count does not match the shape.
    public convenience init(shape: [Int], values: [Float], requiresGrad: Bool = false) throws {
        guard shape.allSatisfy({ $0 >= 0 }) else { throw TensorError.invalidArgument("negative dimension in shape \(shape)") }
        let n = shape.reduce(1, *)
        guard n == values.count else {
            throw TensorError.shapeMismatch("shape \(shape) holds \(n) values, got \(values.count)")
        }
        self.init(zeros: shape, requiresGrad: requiresGrad)
        values.withUnsafeBufferPointer { src in
            if let base = src.baseAddress { data.update(from: base, count: n) }
        }
    }

    public static func scalar(_ value: Float, requiresGrad: Bool = false) -> Tensor {
        let t = Tensor(zeros: [], requiresGrad: requiresGrad)
        t.data[0] = value
        return t
    }

    public static func full(_ shape: [Int], _ value: Float, requiresGrad: Bool = false) -> Tensor {
        let t = Tensor(zeros: shape, requiresGrad: requiresGrad)
        t.data.update(repeating: value, count: t.count)
        return t
    }

    /// Standard normal values times `std`, from an explicit generator.
    public static func randn(_ shape: [Int], std: Float = 1, rng: inout SeededGenerator, requiresGrad: Bool = false) -> Tensor {
        let t = Tensor(zeros: shape, requiresGrad: requiresGrad)
        for i in 0..<t.count { t.data[i] = std * rng.nextGaussian() }
        return t
    }

    /// Uniform values in [low, high), from an explicit generator.
    public static func uniform(_ shape: [Int], low: Float, high: Float, rng: inout SeededGenerator, requiresGrad: Bool = false) -> Tensor {
        let t = Tensor(zeros: shape, requiresGrad: requiresGrad)
        for i in 0..<t.count { t.data[i] = low + (high - low) * rng.nextFloat() }
        return t
    }

    /// The values, copied out in row-major order (from the device for a CUDA tensor).
    public var values: [Float] {
        if device == .cuda { return (try? to(.cpu).values) ?? [] }
        return Array(UnsafeBufferPointer(start: data, count: count))
    }

    /// A copy on `target` (self when already there). Throws when the device is unavailable.
    public func to(_ target: Device) throws -> Tensor {
        if target == device { return self }
        let api = try CUDA.shared.requireDevice()
        if target == .cuda {
            let out = Tensor(shape: shape, storage: try Storage(cudaCount: count))
            try CUDA.shared.check(api.memcpy_h2d(out.storage.address, data, count * 4, nil), "copy to device")
            try CUDA.shared.check(api.stream_synchronize(nil), "synchronize")
            return out
        }
        let out = Tensor(zeros: shape)
        try CUDA.shared.check(api.memcpy_d2h(out.data, storage.address, count * 4, nil), "copy to host")
        try CUDA.shared.check(api.stream_synchronize(nil), "synchronize")
        return out
    }

    /// The single value of a one-element tensor.
    public func item() -> Float {
        require(count == 1, "item() on a tensor of shape \(shape)")
        return data[0]
    }

    /// A new tensor with a copy of the values, outside any graph.
    public func detached() -> Tensor {
        let t = Tensor(zeros: shape)
        t.data.update(from: data, count: count)
        return t
    }

    /// Overwrites the values with another tensor's (same element count); no graph.
    public func copyValues(from other: Tensor) throws {
        guard other.count == count else {
            throw TensorError.shapeMismatch("copy \(other.shape) into \(shape)")
        }
        data.update(from: other.data, count: count)
    }

    public func fill(_ value: Float) { data.update(repeating: value, count: count) }

    /// Strides (in elements) of the row-major layout.
    public static func contiguousStrides(_ shape: [Int]) -> [Int] {
        var strides = [Int](repeating: 1, count: shape.count)
        var s = 1
        for d in stride(from: shape.count - 1, through: 0, by: -1) {
            strides[d] = s
            s *= shape[d]
        }
        return strides
    }

    /// The gradient buffer, zero-allocated on first use (a backward closure adds into it).
    public func gradBuffer() -> Tensor {
        if let g = grad { return g }
        let g = Tensor(zeros: shape)
        grad = g
        return g
    }

    public func zeroGrad() { grad = nil }
}

extension Tensor: CustomStringConvertible {
    public var description: String {
        if device == .cuda { return "Tensor(shape: \(shape), on cuda)" }
        let shown = values.prefix(8).map { String(format: "%.4g", $0) }.joined(separator: ", ")
        return "Tensor(shape: \(shape), [\(shown)\(count > 8 ? ", ..." : "")])"
    }
}
