import Foundation

/// The Python that runs the peers' scripts (scripts/*.py): `python` as given, else the
/// project's `.venv/bin/python` when `make venv` made it, else `python3` on PATH. Shared by
/// `OnnxRuntimePeer` and `OpenCVPeer`.
struct ProjectPython: Sendable {
    var python: String

    /// `python` if given, else the project's venv Python, else python3.
    init(_ python: String? = nil) {
        let venv = FileManager.default.currentDirectoryPath + "/.venv/bin/python"
        self.python = python ?? (FileManager.default.isExecutableFile(atPath: venv) ? venv : "python3")
    }

    /// `scripts/<name>` under the current directory, if it exists.
    static func script(_ name: String) -> String? {
        let path = FileManager.default.currentDirectoryPath + "/scripts/" + name
        return FileManager.default.fileExists(atPath: path) ? path : nil
    }

    /// The Python with these arguments (a bare name is looked up on PATH).
    func process(_ arguments: [String]) -> Process {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: python.hasPrefix("/") ? python : "/usr/bin/env")
        p.arguments = (python.hasPrefix("/") ? [] : [python]) + arguments
        return p
    }

    /// Whether `import <modules>` succeeds (e.g. "onnxruntime, numpy").
    func canImport(_ modules: String) -> Bool {
        let p = process(["-c", "import " + modules])
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        do { try p.run() } catch { return false }
        p.waitUntilExit()
        return p.terminationStatus == 0
    }

    /// Runs with these arguments to the end: standard output, standard error, exit status.
    /// Throws only when the process cannot start.
    func run(_ arguments: [String]) throws -> (output: Data, errors: String, status: Int32) {
        let p = process(arguments)
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        try p.run()
        let data = out.fileHandleForReading.readDataToEndOfFile()
        let errors = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        return (data, errors, p.terminationStatus)
    }
}
