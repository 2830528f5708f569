import CKernels
import Foundation
import QuantLabCore

/// Which kernel a float 3x3 stride-1 conv of a plan runs (issue #12).
///
/// `conv2d` is the model's own conv (the direct kernel or im2col + SGEMM): the model's bits.
/// `winograd` is Winograd F(2x2, 3x3) (conv_winograd.c): 2.25x fewer multiplies, the same
/// values to a few units in the last place, not the same bits. `timed` runs both on the first
/// input of each shape, interleaved, three times each, and keeps the faster for that shape (as
/// `Int8Conv.RouteChoice.timed` does for the INT8 convs' routes, and TensorRT's builder for
/// its tactics).
public enum FloatConvRoute: String, Sendable, CaseIterable {
    case conv2d, winograd, timed

    /// `QL_FLOAT_CONV_ROUTE` (conv2d, winograd or timed); nil when unset.
    public static func fromEnvironment() throws -> FloatConvRoute? {
        guard let text = ProcessInfo.processInfo.environment["QL_FLOAT_CONV_ROUTE"], !text.isEmpty else { return nil }
        guard let route = FloatConvRoute(rawValue: text) else {
            throw EngineError("QL_FLOAT_CONV_ROUTE=\(text): expected one of \(allCases.map(\.rawValue).joined(separator: ", "))")
        }
        return route
    }
}

/// A float conv's weights transformed once for Winograd F(2x2, 3x3) (at its first Winograd
/// run: a plan that keeps the model's convs never pays for it), with the route it took per
/// input shape. Only 3x3, stride 1, undilated, one group (nil otherwise).
final class WinogradConv {
    let weight: Tensor
    let options: Conv2dOptions
    /// The conv's geometry for the weight transform (any input size).
    private var geometry: ql_conv_geom
    /// The transformed weights, nil before the first Winograd run.
    private var packed: [Float]?
    /// `.timed`: per input shape, whether the model's conv (first) won.
    private var timing = TimedChoice()
    /// The best of three times (seconds) of each route at the shape timed last.
    var times: (conv2d: Double, winograd: Double)? { timing.times.map { ($0.first, $0.second) } }
    /// Whether the last run took Winograd (nil before one).
    private(set) var ranWinograd: Bool?

    init?(weight: Tensor, options o: Conv2dOptions) {
        guard weight.rank == 4, weight.device == .cpu else { return nil }
        var g = ql_conv_geom(N: 1, C: Int32(weight.shape[1] * o.groups), H: 3, W: 3, K: Int32(weight.shape[0]), KH: Int32(weight.shape[2]),
                             KW: Int32(weight.shape[3]), SH: Int32(o.stride.0), SW: Int32(o.stride.1), PH: Int32(o.padding.0),
                             PW: Int32(o.padding.1), DH: Int32(o.dilation.0), DW: Int32(o.dilation.1), groups: Int32(o.groups))
        guard ql_winograd_f23_applies(&g) != 0 else { return nil }
        self.weight = weight
        options = o
        geometry = g
    }

    /// The transformed weights, made on first use.
    private func packedWeights() throws -> [Float] {
        if let packed { return packed }
        var w = [Float](repeating: 0, count: ql_winograd_f23_packed_floats(QL_ISA_BEST, &geometry))
        let status = ql_winograd_f23_pack(QL_ISA_BEST, &w, weight.data, &geometry)
        guard status == 0 else { throw EngineError("Winograd conv: weight transform failed (status \(status)) for weight \(weight.shape)") }
        packed = w
        return w
    }

    /// The route's summary for profiles: "Winograd" or "conv2d", with the times that chose it.
    var summary: String? {
        guard let ranWinograd else { return nil }
        let route = ranWinograd ? "Winograd" : "conv2d"
        guard let t = times else { return route }
        return String(format: "%@; timed: conv2d %.0f us, Winograd %.0f us", route, t.conv2d * 1e6, t.winograd * 1e6)
    }

    /// Runs the conv by `route`: `conv2d` is the model's conv (the caller's closure), the others
    /// this class's kernel, in the layouts of `PackedConv2dWeights.forward`.
    func run(_ route: FloatConvRoute, _ x: Tensor, inputPadded: Bool, bias: Tensor?, activation: ConvActivation,
             outputPadding: (Int, Int)?, conv2d: () -> Tensor) throws -> Tensor {
        func winograd() throws -> Tensor {
            try forward(x, inputPadded: inputPadded, bias: bias, activation: activation, outputPadding: outputPadding)
        }
        let useWinograd: Bool
        switch route {
        case .conv2d: useWinograd = false
        case .winograd: useWinograd = true
        case .timed:
            if let conv2dKept = timing.kept(at: x.shape) {
                useWinograd = !conv2dKept
            } else {
                var last = (conv2d: Tensor?.none, winograd: Tensor?.none)
                let conv2dKept = try timing.time(at: x.shape, first: { last.conv2d = conv2d(); return true }, second: { last.winograd = try winograd() })
                ranWinograd = !conv2dKept
                return conv2dKept ? last.conv2d! : last.winograd!
            }
        }
        ranWinograd = useWinograd
        return useWinograd ? try winograd() : conv2d()
    }

    /// Forgets the timings (a new route setting).
    func resetTimings() {
        timing.reset()
        ranWinograd = nil
    }

    private func forward(_ x: Tensor, inputPadded: Bool, bias: Tensor?, activation: ConvActivation, outputPadding: (Int, Int)?) throws -> Tensor {
        let (ph, pw) = options.padding, k = weight.shape[0]
        guard x.rank == 4, x.device == .cpu else { throw EngineError("Winograd conv: input \(x.shape) must be a 4-D CPU tensor") }
        let layouts = ConvLayouts(input: x.shape, inputPadded: inputPadded, padding: options.padding, outputPadding: outputPadding)
        let logical = layouts.logicalInput
        guard logical[1] == weight.shape[1], bias.map({ $0.count == k }) ?? true else {
            throw EngineError("Winograd conv: input \(logical) and bias \(bias?.shape ?? []) do not fit the weight \(weight.shape)")
        }
        var g = ql_conv_geom(N: Int32(logical[0]), C: Int32(logical[1]), H: Int32(logical[2]), W: Int32(logical[3]), K: Int32(k), KH: 3, KW: 3,
                             SH: 1, SW: 1, PH: Int32(ph), PW: Int32(pw), DH: 1, DW: 1, groups: 1)
        var oh: Int32 = 0, ow: Int32 = 0
        guard ql_conv_out_size(&g, &oh, &ow) == 0 else { throw EngineError("Winograd conv: input \(logical) does not fit the conv") }
        let out = Tensor(uninitialized: layouts.outputShape(channels: k, height: Int(oh), width: Int(ow)))
        let status = ql_winograd_f23_fwd_layout(QL_ISA_BEST, out.data, layouts.output, x.data, layouts.input, try packedWeights(), bias?.data,
                                                &g, activation.rawValue)
        guard status == 0 else { throw EngineError("Winograd conv failed (status \(status)) for input \(x.shape)") }
        return out
    }
}
