// Fuzz harness for the readers of outside input (issue #20), built by `make fuzz` with
// libFuzzer (-sanitize=fuzzer, -DFUZZING). QL_FUZZ_TARGET picks the reader:
//   coco         annotations JSON (COCODataset.decode, with validation)
//   detections   detections JSON (COCOResult.decode)
//   safetensors  safetensors header, metadata and data (SafeTensorsFile)
//   jpeg         the libjpeg-turbo wrapper (JPEG.decode)
//   model        a model file's metadata and weights (SavedModel.load, through a temporary file)
//   onnx         an ONNX model (ONNXImport: protobuf decoding, initializers, op attributes)
//   selftest     traps on inputs that start with "QL!": shows that a trap is found and reported
// Any input may be rejected with a thrown error; a crash, a trap or a hang is a finding.
// Seeds live in fuzz/corpus/<target>/; `scripts/fuzz.sh` runs each target for a bounded time.
import Foundation
import QuantLab

#if FUZZING
let target = ProcessInfo.processInfo.environment["QL_FUZZ_TARGET"] ?? "coco"
let scratch = FileManager.default.temporaryDirectory.appendingPathComponent("ql-fuzz-\(ProcessInfo.processInfo.processIdentifier).safetensors")

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOne(_ start: UnsafePointer<UInt8>, _ count: Int) -> CInt {
    let data = Data(bytes: start, count: count)
    switch target {
    case "coco": _ = try? COCODataset.decode(data, source: "fuzz")
    case "detections": _ = try? COCOResult.decode(data, source: "fuzz")
    case "safetensors":
        if let file = try? SafeTensorsFile(data: data, source: "fuzz") { for name in file.names { _ = try? file.tensor(name) } }
    case "jpeg": _ = try? JPEG.decode(data, source: "fuzz")
    case "selftest": // a planted trap, so that the harness shows it finds one (scripts/fuzz.sh --self-test)
        if count >= 4 && start[0] == 0x51 && start[1] == 0x4C && start[2] == 0x21 { fatalError("planted trap found") }
    case "model":
        try? data.write(to: scratch)
        _ = try? SavedModel.load(scratch)
    case "onnx": _ = try? ONNXImport.graph(from: data)
    default: fatalError("QL_FUZZ_TARGET must be coco, detections, safetensors, jpeg, model or onnx, got \(target)")
    }
    return 0
}

// libFuzzer's driver, started from the entry point SwiftPM gives an executable target.
@_silgen_name("LLVMFuzzerRunDriver")
func LLVMFuzzerRunDriver(_ argc: UnsafeMutablePointer<CInt>, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>,
                         _ callback: @convention(c) (UnsafePointer<UInt8>, Int) -> CInt) -> CInt

@_cdecl("qlab_fuzz_main")
public func fuzzMain(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> CInt {
    var argc = argc, argv = argv
    return LLVMFuzzerRunDriver(&argc, &argv) { fuzzOne($0, $1) }
}
#else
@main
struct FuzzHarness {
    static func main() { print("qlab-fuzz is a libFuzzer harness: build and run it with `make fuzz` (scripts/fuzz.sh).") }
}
#endif
