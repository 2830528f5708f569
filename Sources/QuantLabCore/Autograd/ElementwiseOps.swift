import CKernels

// Elementwise, broadcasting, shape and reduction ops. Each op computes its forward with a C
// kernel and records a backward that accumulates into its inputs' gradients.

// MARK: - Unary

extension Tensor {
    private func unary(_ op: ql_unary_op, _ name: String, needsOutput: Bool) -> Tensor {
        if device == .cuda { return CUDAOps.unary(op, name, self) }
        let out = Tensor(uninitialized: shape)
        ql_unary_fwd(op, out.data, data, Int64(count))
        traceOp(op == QL_UNARY_RELU ? .relu : op == QL_UNARY_SIGMOID ? .sigmoid : op == QL_UNARY_SILU ? .silu : op == QL_UNARY_GELU ? .gelu : .unsupported(name), [self], out)
        return record(out, name, [self]) { [unowned out] g in
            // the first gradient is written, not added to a zero-filled buffer
            let first = self.grad == nil
            let dx = first ? Tensor(uninitialized: self.shape) : self.grad!
            ql_unary_bwd_into(op, dx.data, g.data, self.data, needsOutput ? out.data : nil, Int64(self.count), first ? 0 : 1)
            if first { self.grad = dx }
        }
    }

    public func relu() -> Tensor { unary(QL_UNARY_RELU, "relu", needsOutput: false) }
    public func sigmoid() -> Tensor { unary(QL_UNARY_SIGMOID, "sigmoid", needsOutput: true) }
    /// x * sigmoid(x), the activation of YOLOv6's larger models.
    public func silu() -> Tensor { unary(QL_UNARY_SILU, "silu", needsOutput: false) }
    public func exp() -> Tensor { unary(QL_UNARY_EXP, "exp", needsOutput: true) }
    public func log() -> Tensor { unary(QL_UNARY_LOG, "log", needsOutput: false) }
    public func abs() -> Tensor { unary(QL_UNARY_ABS, "abs", needsOutput: false) }
    public func sqrt() -> Tensor { unary(QL_UNARY_SQRT, "sqrt", needsOutput: true) }
    public func tanh() -> Tensor { unary(QL_UNARY_TANH, "tanh", needsOutput: true) }
    /// x * Phi(x) with the normal CDF Phi (erf form; PyTorch's GELU default, RT-DETR's AIFI FFN).
    public func gelu() -> Tensor { unary(QL_UNARY_GELU, "gelu", needsOutput: false) }
    public static prefix func - (x: Tensor) -> Tensor { x.unary(QL_UNARY_NEG, "neg", needsOutput: false) }

    /// a * x + b with scalar a and b.
    public func scaled(by a: Float, plus b: Float = 0) -> Tensor {
        if device == .cuda { return CUDAOps.scaleShift(self, a, b) }
        let out = Tensor(uninitialized: shape)
        ql_scale_shift(out.data, data, a, b, Int64(count))
        traceOp(.affine(scale: a, shift: b), [self], out)
        return record(out, "scale_shift", [self]) { g in
            ql_axpy(self.gradBuffer().data, a, g.data, Int64(self.count))
        }
    }
}

// MARK: - Binary with numpy broadcasting

/// Output shape of broadcasting `a` with `b` (numpy rules: align right, 1 stretches).
public func broadcastShape(_ a: [Int], _ b: [Int]) -> [Int]? {
    let n = max(a.count, b.count)
    var out = [Int](repeating: 1, count: n)
    for i in 0..<n {
        let da = i < n - a.count ? 1 : a[i - (n - a.count)]
        let db = i < n - b.count ? 1 : b[i - (n - b.count)]
        if da != db && da != 1 && db != 1 { return nil }
        out[i] = da == 1 ? db : da
    }
    return out
}

/// Element strides of `shape` read as broadcast to `target` (0 along stretched dims).
func broadcastStrides(_ shape: [Int], to target: [Int]) -> [Int64] {
    let own = Tensor.contiguousStrides(shape)
    let offset = target.count - shape.count
    return (0..<target.count).map { i in
        if i < offset { return 0 }
        return shape[i - offset] == 1 && target[i] != 1 ? 0 : Int64(own[i - offset])
    }
}

private func binary(_ op: ql_binary_op, _ name: String, _ a: Tensor, _ b: Tensor) -> Tensor {
    guard let shape = broadcastShape(a.shape, b.shape) else {
        fatalError("\(name): shapes \(a.shape) and \(b.shape) do not broadcast")
    }
    require(shape.count <= Int(QL_MAX_DIMS), "\(name): rank \(shape.count) > \(QL_MAX_DIMS)")
    let sa = broadcastStrides(a.shape, to: shape), sb = broadcastStrides(b.shape, to: shape)
    if a.device == .cuda || b.device == .cuda { return CUDAOps.binary(op, name, a, b, shape: shape, sa: sa, sb: sb) }
    let out = Tensor(uninitialized: shape)
    let dims = shape.map { Int64($0) }
    let st = ql_binary_strided(op, out.data, a.data, sa, b.data, sb, dims, Int32(shape.count))
    require(st == 0, "\(name): kernel status \(st)")
    traceOp(op == QL_BINARY_ADD ? .add : op == QL_BINARY_SUB ? .sub : op == QL_BINARY_MUL ? .mul : op == QL_BINARY_DIV ? .div : .unsupported(name), [a, b], out)
    return record(out, name, [a, b]) { g in
        // a sum of same-shape tensors (a Rep block's branches, a residual): each input's
        // gradient is g itself: the first input's may be g's buffer (the backward releases it
        // after this node), the second's a copy
        if op == QL_BINARY_ADD && a.shape == shape && b.shape == shape {
            if a.requiresGrad { a.adoptOrAccumulateGrad(g) }
            if b.requiresGrad { b.accumulateGrad(g) }
            return
        }
        _ = ql_binary_strided_bwd(op, a.requiresGrad ? a.gradBuffer().data : nil, sa,
                                  b.requiresGrad ? b.gradBuffer().data : nil, sb,
                                  g.data, a.data, b.data, dims, Int32(shape.count))
    }
}

public func + (a: Tensor, b: Tensor) -> Tensor { binary(QL_BINARY_ADD, "add", a, b) }
public func - (a: Tensor, b: Tensor) -> Tensor { binary(QL_BINARY_SUB, "sub", a, b) }
public func * (a: Tensor, b: Tensor) -> Tensor { binary(QL_BINARY_MUL, "mul", a, b) }
public func / (a: Tensor, b: Tensor) -> Tensor { binary(QL_BINARY_DIV, "div", a, b) }
public func maximum(_ a: Tensor, _ b: Tensor) -> Tensor { binary(QL_BINARY_MAX, "maximum", a, b) }
public func minimum(_ a: Tensor, _ b: Tensor) -> Tensor { binary(QL_BINARY_MIN, "minimum", a, b) }
public func * (a: Tensor, s: Float) -> Tensor { a.scaled(by: s) }
public func * (s: Float, a: Tensor) -> Tensor { a.scaled(by: s) }
public func + (a: Tensor, s: Float) -> Tensor { a.scaled(by: 1, plus: s) }
public func - (a: Tensor, s: Float) -> Tensor { a.scaled(by: 1, plus: -s) }

// MARK: - Shape ops

extension Tensor {
    /// Same values, new shape (one dim may be -1). Shares storage; the gradient is reshaped back.
    public func reshaped(_ newShape: [Int]) -> Tensor {
        var dims = newShape
        if let i = dims.firstIndex(of: -1) {
            let known = dims.enumerated().filter { $0.offset != i }.map(\.element).reduce(1, *)
            require(known > 0 && count % known == 0, "reshape \(shape) to \(newShape)")
            dims[i] = count / known
        }
        require(dims.reduce(1, *) == count, "reshape \(shape) (\(count) values) to \(newShape)")
        let out = Tensor(shape: dims, storage: storage)
        traceOp(.reshape(dims), [self], out)
        return record(out, "reshape", [self]) { g in ql_axpy_into(self.gradBuffer(), g) }
    }

    public func flattened(fromDim start: Int = 1) -> Tensor {
        reshaped(Array(shape[..<start]) + [shape[start...].reduce(1, *)])
    }

    /// Permutes dims: out.shape[i] = shape[order[i]].
    public func permuted(_ order: [Int]) -> Tensor {
        require(order.sorted() == Array(0..<rank), "permute \(shape) by \(order)")
        let outShape = order.map { shape[$0] }
        let inStrides = Tensor.contiguousStrides(shape)
        let readStrides = order.map { Int64(inStrides[$0]) }
        if device == .cuda { return CUDAOps.copyStrided("permute", self, strides: readStrides, shape: outShape) }
        let out = Tensor(zeros: outShape)
        let dims = outShape.map { Int64($0) }
        _ = ql_copy_strided(out.data, data, readStrides, dims, Int32(rank))
        traceOp(.transpose(order), [self], out)
        return record(out, "permute", [self]) { g in
            _ = ql_accumulate_strided(self.gradBuffer().data, readStrides, g.data, dims, Int32(self.rank))
        }
    }

    public func transposed(_ d0: Int, _ d1: Int) -> Tensor {
        var order = Array(0..<rank)
        order.swapAt(d0, d1)
        return permuted(order)
    }

    /// Elements [start, end) along `dim`.
    public func slice(dim: Int, start: Int, end: Int) -> Tensor {
        require(dim >= 0 && dim < rank && 0 <= start && start <= end && end <= shape[dim],
                     "slice [\(start), \(end)) of dim \(dim) of \(shape)")
        var outShape = shape
        outShape[dim] = end - start
        let strides = Tensor.contiguousStrides(shape).map { Int64($0) }
        let offset = start * Int(strides[dim])
        if device == .cuda { return CUDAOps.copyStrided("slice", self, offset: offset, strides: strides, shape: outShape) }
        let out = Tensor(zeros: outShape)
        let dims = outShape.map { Int64($0) }
        _ = ql_copy_strided(out.data, data + offset, strides, dims, Int32(rank))
        traceOp(.slice(axis: dim, start: start, end: end), [self], out)
        return record(out, "slice", [self]) { g in
            _ = ql_accumulate_strided(self.gradBuffer().data + offset, strides, g.data, dims, Int32(self.rank))
        }
    }

    /// Broadcasts to `target` (numpy rules) by copying.
    public func expanded(to target: [Int]) -> Tensor {
        require(broadcastShape(shape, target) == target, "expand \(shape) to \(target)")
        let strides = broadcastStrides(shape, to: target)
        let out = Tensor(zeros: target)
        let dims = target.map { Int64($0) }
        _ = ql_copy_strided(out.data, data, strides, dims, Int32(target.count))
        traceOp(.unsupported("expand"), [self], out)
        return record(out, "expand", [self]) { g in
            _ = ql_accumulate_strided(self.gradBuffer().data, strides, g.data, dims, Int32(target.count))
        }
    }
}

/// Concatenation along `dim`; all other dims must agree.
public func concat(_ tensors: [Tensor], dim: Int) -> Tensor {
    require(!tensors.isEmpty, "concat of no tensors")
    let first = tensors[0].shape
    for t in tensors {
        require(t.rank == first.count && (0..<first.count).allSatisfy { $0 == dim || t.shape[$0] == first[$0] },
                     "concat along \(dim): shapes \(tensors.map(\.shape))")
    }
    var outShape = first
    outShape[dim] = tensors.map { $0.shape[dim] }.reduce(0, +)
    let outer = first[..<dim].reduce(1, *), inner = first[(dim + 1)...].reduce(1, *)
    if tensors[0].device == .cuda { return CUDAOps.concat(tensors, outShape: outShape, dim: dim, outer: outer, inner: inner) }
    let out = Tensor(zeros: outShape)
    let outRow = outShape[dim] * inner
    var offset = 0
    var offsets: [Int] = []
    for t in tensors {
        offsets.append(offset)
        let rowLen = t.shape[dim] * inner
        for o in 0..<outer {
            (out.data + o * outRow + offset).update(from: t.data + o * rowLen, count: rowLen)
        }
        offset += rowLen
    }
    traceOp(.concat(axis: dim), tensors, out)
    return record(out, "concat", tensors) { g in
        for (t, off) in zip(tensors, offsets) where t.requiresGrad {
            let rowLen = t.shape[dim] * inner
            let gt = t.gradBuffer()
            for o in 0..<outer {
                ql_axpy(gt.data + o * rowLen, 1, g.data + o * outRow + off, Int64(rowLen))
            }
        }
    }
}

extension Tensor {
    /// Rows of a [N, D] tensor (or of its flattening to [N, D] over the leading dims) in the
    /// given order, repeats allowed: out[i] = self[indices[i]]. The backward scatter-adds.
    public func gatherRows(_ indices: [Int]) -> Tensor {
        let d = shape.last ?? 1, n = count / max(d, 1)
        require(indices.allSatisfy { $0 >= 0 && $0 < n }, "gatherRows: an index is outside [0, \(n))")
        let out = Tensor(zeros: [indices.count, d])
        for (i, r) in indices.enumerated() { (out.data + i * d).update(from: data + r * d, count: d) }
        traceOp(.unsupported("gather_rows"), [self], out)
        return record(out, "gather_rows", [self]) { g in
            let gb = self.gradBuffer()
            for (i, r) in indices.enumerated() { ql_axpy(gb.data + r * d, 1, g.data + i * d, Int64(d)) }
        }
    }
}

// MARK: - Reductions

extension Tensor {
    /// Sum of all elements (a scalar tensor of shape []).
    public func sum() -> Tensor {
        let out = Tensor.scalar(Float(ql_sum(data, Int64(count))))
        traceOp(.unsupported("sum"), [self], out)
        return record(out, "sum", [self]) { g in
            let gb = self.gradBuffer()
            ql_scale_shift(gb.data, gb.data, 1, g.data[0], Int64(self.count))
        }
    }

    public func mean() -> Tensor { sum().scaled(by: 1 / Float(max(count, 1))) }

    /// Sum over `dims`; the result keeps them as size 1 when `keepDims`, else drops them.
    public func sum(dims: [Int], keepDims: Bool = false) -> Tensor {
        let reduced = Set(dims.map { $0 < 0 ? $0 + rank : $0 })
        require(reduced.allSatisfy { $0 >= 0 && $0 < rank }, "sum over \(dims) of \(shape)")
        let keptShape = shape.enumerated().map { reduced.contains($0.offset) ? 1 : $0.element }
        let out = Tensor(zeros: keptShape)
        let strides = broadcastStrides(keptShape, to: shape)
        let dims64 = shape.map { Int64($0) }
        _ = ql_accumulate_strided(out.data, strides, data, dims64, Int32(rank))
        traceOp(.unsupported("sum(dims:)"), [self], out)
        let result = record(out, "sum_dims", [self]) { g in
            let gb = self.gradBuffer()
            let dense = broadcastStrides(self.shape, to: self.shape)
            _ = ql_binary_strided(QL_BINARY_ADD, gb.data, gb.data, dense, g.data, strides, dims64, Int32(self.rank))
        }
        if keepDims { return result }
        return result.reshaped(shape.enumerated().filter { !reduced.contains($0.offset) }.map(\.element))
    }

    public func mean(dims: [Int], keepDims: Bool = false) -> Tensor {
        let n = dims.map { shape[$0 < 0 ? $0 + rank : $0] }.reduce(1, *)
        return sum(dims: dims, keepDims: keepDims).scaled(by: 1 / Float(max(n, 1)))
    }

    /// max |x| over all elements, outside the graph.
    public func absMax() -> Float { ql_absmax(data, Int64(count)) }
}

// MARK: - Softmax family (over the last dim)

extension Tensor {
    public func softmax() -> Tensor {
        if device == .cuda { return CUDAOps.softmax(self) }
        let cols = shape.last ?? 1, rows = count / max(cols, 1)
        let out = Tensor(zeros: shape)
        ql_softmax_rows(out.data, data, Int64(rows), Int32(cols))
        traceOp(.softmax, [self], out)
        return record(out, "softmax", [self]) { [unowned out] g in
            ql_softmax_rows_bwd(self.gradBuffer().data, g.data, out.data, Int64(rows), Int32(cols))
        }
    }

    public func logSoftmax() -> Tensor {
        let cols = shape.last ?? 1, rows = count / max(cols, 1)
        let out = Tensor(zeros: shape)
        ql_log_softmax_rows(out.data, data, Int64(rows), Int32(cols))
        traceOp(.unsupported("log_softmax"), [self], out)
        return record(out, "log_softmax", [self]) { [unowned out] g in
            ql_log_softmax_rows_bwd(self.gradBuffer().data, g.data, out.data, Int64(rows), Int32(cols))
        }
    }
}
