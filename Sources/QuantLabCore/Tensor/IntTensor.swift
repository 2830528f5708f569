/// A contiguous integer tensor (int8 activations and weights, int32 accumulators) for the
/// INT8 engine. No autograd: integer tensors appear only after quantization. Storage is
/// 64-byte aligned so SIMD kernels may use aligned loads.
public final class IntTensor<Element: FixedWidthInteger> {
    public let shape: [Int]
    public let count: Int
    public let data: UnsafeMutablePointer<Element>

    public init(zeros shape: [Int]) {
        require(shape.allSatisfy { $0 >= 0 }, "negative dimension in shape \(shape)")
        self.shape = shape
        count = shape.reduce(1, *)
        let raw = UnsafeMutableRawPointer.allocate(byteCount: max(count, 1) * MemoryLayout<Element>.stride, alignment: 64)
        data = raw.bindMemory(to: Element.self, capacity: max(count, 1))
        data.initialize(repeating: 0, count: max(count, 1))
    }

    public convenience init(shape: [Int], values: [Element]) throws {
        guard shape.allSatisfy({ $0 >= 0 }), shape.reduce(1, *) == values.count else {
            throw TensorError.shapeMismatch("shape \(shape) holds \(shape.reduce(1, *)) values, got \(values.count)")
        }
        self.init(zeros: shape)
        for (i, v) in values.enumerated() { data[i] = v }
    }

    deinit { data.deallocate() }

    public var values: [Element] { Array(UnsafeBufferPointer(start: data, count: count)) }
}

public typealias Int8Tensor = IntTensor<Int8>
public typealias UInt8Tensor = IntTensor<UInt8>
public typealias Int32Tensor = IntTensor<Int32>
