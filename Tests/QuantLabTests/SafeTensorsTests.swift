import Foundation
import Testing
@testable import QuantLabCore
@testable import QuantLabData
@testable import QuantLabModels
@testable import QuantLabQuant
@testable import QuantLabReport

@Suite("safetensors checkpoints")
struct SafeTensorsTests {
    private func header(_ json: String, body: [UInt8] = []) -> Data {
        var d = Data()
        var n = UInt64(json.utf8.count).littleEndian
        withUnsafeBytes(of: &n) { d.append(contentsOf: $0) }
        d.append(contentsOf: Array(json.utf8))
        d.append(contentsOf: body)
        return d
    }

    private func expectError(_ data: Data, containing fragment: String, sourceLocation: SourceLocation = #_sourceLocation) {
        do {
            _ = try SafeTensorsFile(data: data, source: "bad.safetensors")
            Issue.record("no error for a file that should fail with '\(fragment)'", sourceLocation: sourceLocation)
        } catch let e as SafeTensorsError {
            #expect(e.message.contains(fragment) && e.message.hasPrefix("bad.safetensors"), "message: \(e.message)", sourceLocation: sourceLocation)
        } catch {
            Issue.record("unexpected error \(error)", sourceLocation: sourceLocation)
        }
    }

    @Test("round trip of values, shapes, names and metadata; 8-byte aligned data")
    func roundTrip() throws {
        var rng = SeededGenerator(seed: 1)
        let a = Tensor.randn([2, 3, 4], rng: &rng), b = Tensor.randn([5], rng: &rng), c = Tensor.scalar(3.5)
        let data = try SafeTensors.encode([("layer.weight", .float32(a)), ("layer.bias", .float32(b)), ("step", .float32(c))],
                                          metadata: ["format": "pt", "seed": "1"])
        let n = data.prefix(8).enumerated().reduce(0) { $0 | Int($1.element) << (8 * $1.offset) }
        #expect((8 + n) % 8 == 0)
        let file = try SafeTensorsFile(data: data)
        #expect(Set(file.names) == ["layer.weight", "layer.bias", "step"])
        #expect(file.metadata == ["format": "pt", "seed": "1"])
        #expect(try file.tensor("layer.weight").shape == [2, 3, 4])
        #expect(try file.tensor("layer.weight").values == a.values)
        #expect(try file.tensor("layer.bias").values == b.values)
        #expect(try file.tensor("step").shape == [] && (try file.tensor("step").item()) == 3.5)
    }

    @Test("other dtypes convert to float32 exactly")
    func dtypes() throws {
        let f16: [UInt16] = [Float16(1.5).bitPattern, Float16(-2).bitPattern]
        let bf16: [UInt16] = [UInt16(Float(0.15625).bitPattern >> 16), UInt16(Float(-3).bitPattern >> 16)]
        func bytes<T>(_ v: [T]) -> Data { v.withUnsafeBytes { Data($0) } }
        let data = try SafeTensors.encode([
            ("i8", .raw(.I8, shape: [3], bytes: bytes([Int8(-128), 0, 127]))),
            ("u8", .raw(.U8, shape: [2], bytes: bytes([UInt8(0), 255]))),
            ("i64", .raw(.I64, shape: [1], bytes: bytes([Int64(-7)]))),
            ("f16", .raw(.F16, shape: [2], bytes: bytes(f16))),
            ("bf16", .raw(.BF16, shape: [2], bytes: bytes(bf16))),
            ("f64", .raw(.F64, shape: [1], bytes: bytes([0.25]))),
        ])
        let t = try SafeTensorsFile(data: data).tensors()
        #expect(t["i8"]!.values == [-128, 0, 127] && t["u8"]!.values == [0, 255] && t["i64"]!.values == [-7])
        #expect(t["f16"]!.values == [1.5, -2] && t["bf16"]!.values == [0.15625, -3] && t["f64"]!.values == [0.25])
        #expect(throws: SafeTensorsError.self) { try SafeTensors.encode([("x", .raw(.I32, shape: [2], bytes: Data([1, 2, 3])))]) }
    }

    @Test("malformed files are errors that name the file and the problem")
    func malformed() throws {
        expectError(Data([1, 2, 3]), containing: "shorter than the 8-byte header")
        expectError(header("{}").prefix(6) + Data([0xff, 0xff]), containing: "exceeds the limit")
        expectError(header("{\"a\": 1}").prefix(12), containing: "runs past the end")
        expectError(header("not json"), containing: "not a JSON object")
        expectError(header("[1, 2]"), containing: "not a JSON object")
        expectError(header(#"{"w": {"shape": [1], "data_offsets": [0, 4]}}"#, body: [0, 0, 0, 0]), containing: "missing field dtype")
        expectError(header(#"{"w": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 4]}}"#, body: [0, 0, 0, 0]), containing: "unsupported dtype Q4")
        expectError(header(#"{"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}"#, body: [0, 0, 0, 0]), containing: "non-negative integer")
        expectError(header(#"{"w": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}}"#, body: [0, 0, 0, 0]), containing: "non-negative integer")
        expectError(header(#"{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}"#, body: [0, 0, 0, 0]), containing: "expected 8")
        expectError(header(#"{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}"#, body: [0, 0, 0, 0]), containing: "outside the data buffer")
        expectError(header(#"{"w": {"dtype": "F32", "shape": [1], "data_offsets": [4]}}"#, body: [0, 0, 0, 0]), containing: "data_offsets must be")
        expectError(header(#"{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "v": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}"#,
                           body: [UInt8](repeating: 0, count: 8)), containing: "overlaps")
        expectError(header(#"{"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}"#, body: [UInt8](repeating: 0, count: 8)), containing: "gap")
        expectError(header(#"{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}"#, body: [UInt8](repeating: 0, count: 6)), containing: "trailing bytes")
        expectError(header(#"{"__metadata__": {"k": 1}}"#), containing: "__metadata__.k is not a string")
        expectError(header(#"{"w": {"dtype": "F32", "shape": [4294967296, 4294967296, 4294967296], "data_offsets": [0, 4]}}"#, body: [0, 0, 0, 0]),
                    containing: "non-negative integer")
    }

    @Test("every truncation of a valid file is rejected, never a crash")
    func truncations() throws {
        var rng = SeededGenerator(seed: 2)
        let data = try SafeTensors.encode([("a", .float32(Tensor.randn([3, 3], rng: &rng))), ("b", .float32(Tensor.randn([2], rng: &rng)))])
        for cut in 0..<data.count {
            #expect(throws: SafeTensorsError.self) { try SafeTensorsFile(data: data.prefix(cut)) }
        }
    }

    @Test("module checkpoint: atomic save, load, and a clear error for a missing file or wrong model")
    func moduleCheckpoint() throws {
        var rng = SeededGenerator(seed: 3)
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("ql-st-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: dir) }
        let url = dir.appendingPathComponent("model.safetensors")
        let model = Sequential([Conv2d(2, 3, kernel: 3, rng: &rng), BatchNorm2d(3)])
        try model.save(to: url, metadata: ["arch": "test"])
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir.path) == ["model.safetensors"])
        let copy = Sequential([Conv2d(2, 3, kernel: 3, rng: &rng), BatchNorm2d(3)])
        #expect(try copy.load(from: url) == ["arch": "test"])
        #expect(copy.stateDict().map { $0.1.values } == model.stateDict().map { $0.1.values })
        let wrong = Sequential([Conv2d(2, 4, kernel: 3, rng: &rng), BatchNorm2d(4)])
        #expect(throws: SafeTensorsError.self) { try wrong.load(from: url) }
        #expect(throws: SafeTensorsError.self) { try copy.load(from: dir.appendingPathComponent("missing.safetensors")) }
    }

    /// Interoperability with the reference implementation, when `make crosscheck` has set up
    /// the project virtualenv with Python's safetensors (skipped otherwise, with the reason).
    @Test("Python's safetensors reads our file and we read its file",
          .enabled(if: SafeTensorsTests.pythonWithSafetensors != nil, "needs .venv/bin/python with safetensors: run `make crosscheck` first"))
    func pythonInterop() throws {
        let python = SafeTensorsTests.pythonWithSafetensors!
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("ql-py-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: dir) }
        var rng = SeededGenerator(seed: 4)
        let w = Tensor.randn([4, 3], rng: &rng)
        let ours = dir.appendingPathComponent("ours.safetensors"), theirs = dir.appendingPathComponent("theirs.safetensors")
        try SafeTensors.save([("w", w)], metadata: ["who": "quantlab"], to: ours)
        let script = """
        import sys, numpy as np
        from safetensors.numpy import load_file, save_file
        from safetensors import safe_open
        t = load_file(sys.argv[1])
        with safe_open(sys.argv[1], "np") as f: meta = f.metadata()
        assert meta == {"who": "quantlab"}, meta
        save_file({"w2": (t["w"] * 2).astype(np.float32), "h": np.array([1.5, -2], dtype=np.float16)}, sys.argv[2], metadata={"who": "python"})
        """
        let p = Process()
        p.executableURL = URL(fileURLWithPath: python)
        p.arguments = ["-c", script, ours.path, theirs.path]
        try p.run()
        p.waitUntilExit()
        #expect(p.terminationStatus == 0)
        let back = try SafeTensorsFile(contentsOf: theirs)
        #expect(back.metadata == ["who": "python"])
        #expect(try back.tensor("w2").values == w.values.map { $0 * 2 })
        #expect(try back.tensor("h").values == [1.5, -2])
    }

    static var pythonWithSafetensors: String? {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let python = root.appendingPathComponent(".venv/bin/python").path
        guard FileManager.default.isExecutableFile(atPath: python) else { return nil }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: python)
        p.arguments = ["-c", "import safetensors, numpy"]
        p.standardError = FileHandle.nullDevice
        guard (try? p.run()) != nil else { return nil }
        p.waitUntilExit()
        return p.terminationStatus == 0 ? python : nil
    }
}
