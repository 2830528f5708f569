import CKernels
import CQLCuda

/// Forward ops on CUDA tensors, through the plugin's kernels. The op functions of the
/// library (relu, +, linear, conv2d, ...) call these when their inputs live on the GPU.
/// Autograd is CPU-only for now: recording a graph through a CUDA tensor stops with a clear
/// message (evaluate under `withNoGrad`, or train on the CPU).
enum CUDAOps {
    static func api() -> qlc_api {
        do { return try CUDA.shared.requireDevice() } catch { fatalError("\(error)") }
    }

    static func check(_ status: Int32, _ what: String) {
        do { try CUDA.shared.check(status, what) } catch { fatalError("\(error)") }
    }

    /// An op's output; `zeroed` only where the op accumulates into it.
    static func empty(_ shape: [Int], zeroed: Bool = false) -> Tensor {
        do { return Tensor(shape: shape, storage: try Storage(cudaCount: shape.reduce(1, *), zeroed: zeroed)) } catch {
            fatalError("\(error)")
        }
    }

    static func noGraph(_ name: String, _ inputs: [Tensor]) {
        require(!(GradMode.isEnabled && inputs.contains { $0.requiresGrad }),
                     "\(name): autograd on CUDA tensors is not supported yet; run under withNoGrad { } or on the CPU")
        require(inputs.allSatisfy { $0.device == .cuda }, "\(name): inputs on different devices \(inputs.map(\.device))")
    }

    static func unary(_ op: ql_unary_op, _ name: String, _ x: Tensor) -> Tensor {
        noGraph(name, [x])
        let out = empty(x.shape)
        check(api().unary_fwd(nil, Int32(op.rawValue), out.deviceData, x.deviceData, Int64(x.count)), name)
        return out
    }

    static func scaleShift(_ x: Tensor, _ a: Float, _ b: Float) -> Tensor {
        noGraph("scale_shift", [x])
        let out = empty(x.shape)
        check(api().scale_shift(nil, out.deviceData, x.deviceData, a, b, Int64(x.count)), "scale_shift")
        return out
    }

    static func binary(_ op: ql_binary_op, _ name: String, _ a: Tensor, _ b: Tensor, shape: [Int], sa: [Int64], sb: [Int64]) -> Tensor {
        noGraph(name, [a, b])
        let out = empty(shape)
        let dims = shape.map { Int64($0) }
        check(api().binary_strided(nil, Int32(op.rawValue), out.deviceData, a.deviceData, sa, b.deviceData, sb, dims, Int32(shape.count)), name)
        return out
    }

    static func softmax(_ x: Tensor) -> Tensor {
        noGraph("softmax", [x])
        let cols = x.shape.last ?? 1
        let out = empty(x.shape)
        check(api().softmax_rows(nil, out.deviceData, x.deviceData, Int64(x.count / max(cols, 1)), Int32(cols)), "softmax")
        return out
    }

    /// y = x W^T + b over the last dim.
    static func linear(_ x: Tensor, _ w: Tensor, _ b: Tensor?) -> Tensor {
        noGraph("linear", [x, w] + (b.map { [$0] } ?? []))
        let (outF, inF) = (w.shape[0], w.shape[1]), rows = x.count / max(inF, 1)
        let out = empty(Array(x.shape.dropLast()) + [outF], zeroed: b != nil) // out = 0 + b, then += x W^T
        if let b { // broadcast the bias into every row, then accumulate the product (beta = 1)
            check(api().binary_strided(nil, Int32(QL_BINARY_ADD.rawValue), out.deviceData, out.deviceData, [Int64(outF), 1],
                                       b.deviceData, [0, 1], [Int64(rows), Int64(outF)], 2), "linear bias")
        }
        check(api().sgemm(nil, 0, 1, Int32(rows), Int32(outF), Int32(inF), 1, x.deviceData, Int32(inF), w.deviceData, Int32(inF),
                          b == nil ? 0 : 1, out.deviceData, Int32(outF)), "linear")
        return out
    }

    static func matmul(_ a: Tensor, _ b: Tensor, batch: Int, m: Int, k: Int, n: Int, sharedB: Bool, outShape: [Int]) -> Tensor {
        noGraph("matmul", [a, b])
        let out = empty(outShape)
        for i in 0..<batch {
            check(api().sgemm(nil, 0, 0, Int32(m), Int32(n), Int32(k), 1, a.deviceData + i * m * k, Int32(k),
                              b.deviceData + (sharedB ? 0 : i * k * n), Int32(n), 0, out.deviceData + i * m * n, Int32(n)), "matmul")
        }
        return out
    }

    /// out[dense index over `shape`] = x[offset + strided index]: permute and slice.
    static func copyStrided(_ name: String, _ x: Tensor, offset: Int = 0, strides: [Int64], shape: [Int]) -> Tensor {
        noGraph(name, [x])
        let out = empty(shape)
        check(api().copy_strided(nil, out.deviceData, x.deviceData + offset, strides, shape.map { Int64($0) }, Int32(shape.count)), name)
        return out
    }

    /// Concatenation along `dim`: each input is `outer` rows of shape[dim] * inner floats.
    static func concat(_ tensors: [Tensor], outShape: [Int], dim: Int, outer: Int, inner: Int) -> Tensor {
        noGraph("concat", tensors)
        let out = empty(outShape)
        let pointers: [UnsafeRawPointer?] = tensors.map { UnsafeRawPointer($0.deviceData) }
        check(api().concat_rows(nil, out.deviceData, pointers, tensors.map { Int64($0.shape[dim] * inner * 4) }, Int32(tensors.count), Int64(outer)), "concat")
        return out
    }

    /// conv2d as im2col + SGEMM per image and group, bias added by a broadcast.
    static func conv2d(_ x: Tensor, _ w: Tensor, _ b: Tensor?, _ g: ql_conv_geom, oh: Int, ow: Int) -> Tensor {
        noGraph("conv2d", [x, w] + (b.map { [$0] } ?? []))
        let (n, c, h, wd, k) = (Int(g.N), Int(g.C), Int(g.H), Int(g.W), Int(g.K))
        let groups = Int(g.groups), cg = c / groups, kg = k / groups, kk = cg * Int(g.KH * g.KW), p = oh * ow
        let out = empty([n, k, oh, ow])
        let pointwise = g.KH == 1 && g.KW == 1 && g.SH == 1 && g.SW == 1 && g.PH == 0 && g.PW == 0
        let col = pointwise ? nil : empty([kk, p])
        for i in 0..<n {
            for grp in 0..<groups {
                let xg = x.deviceData + (i * c + grp * cg) * h * wd
                if let col {
                    check(api().im2col(nil, col.deviceData, xg, Int32(cg), Int32(h), Int32(wd), g.KH, g.KW, g.SH, g.SW, g.PH, g.PW, g.DH, g.DW), "im2col")
                }
                check(api().sgemm(nil, 0, 0, Int32(kg), Int32(p), Int32(kk), 1, w.deviceData + grp * kg * kk, Int32(kk),
                                  col?.deviceData ?? xg, Int32(p), 0, out.deviceData + (i * k + grp * kg) * p, Int32(p)), "conv2d gemm")
            }
        }
        if let b {
            check(api().binary_strided(nil, Int32(QL_BINARY_ADD.rawValue), out.deviceData, out.deviceData,
                                       [Int64(k * p), Int64(p), 1], b.deviceData, [0, 1, 0], [Int64(n), Int64(k), Int64(p)], 3), "conv2d bias")
        }
        return out
    }
}
