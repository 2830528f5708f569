import ArgumentParser
import Foundation
import QuantLab

/// Makes sure `path` is (or can become) a writable folder before any work starts, so that a
/// run does not train for an hour and then fail at its first save. The error names the flag,
/// the path and the reason.
func requireWritableFolder(_ path: String, flag: String) throws {
    let url = URL(fileURLWithPath: path)
    var isDirectory: ObjCBool = false
    if FileManager.default.fileExists(atPath: url.path, isDirectory: &isDirectory), !isDirectory.boolValue {
        throw ValidationError("\(flag): \(url.path) is a file, not a folder")
    }
    do {
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
        let probe = url.appendingPathComponent(".write-test-\(ProcessInfo.processInfo.processIdentifier)")
        try Data().write(to: probe)
        try FileManager.default.removeItem(at: probe)
    } catch {
        throw ValidationError("\(flag): cannot write to \(url.path) (\(failureReason(error)))")
    }
}
