// Image formats per VDI. An SR declares the formats it holds (`supported_image_formats`,
// the default first); each VDI is one format, its whole chain with it, and its file is
// named `<uuid>.<format's extension>` (`.vhd`, `.raw`), so the name says the format:
// the file's extension is what every open goes by, and the record's
// `sm_config:image-format` says the same for the API (and for a VDI whose file is gone).

import Foundation
import Image

extension SR {
    /// The format of an image file, from the extension its name ends with (image files,
    /// staging files and overlays all end with their format's), else the SR's default.
    func format(at path: String) -> any ImageFormat {
        let ext = (path as NSString).pathExtension
        return Formats.all.first { $0.fileExtension == ext } ?? format
    }

    /// The format of a VDI or hidden base: the file in the SR that is its, else the one
    /// its record names, else the SR's default.
    public func format(of uuid: String) -> any ImageFormat {
        if let n = formatCache.withLock({ $0[uuid] }), let f = Formats.named(n) { return f }
        for f in Formats.all where access("\(path)/\(uuid).\(f.fileExtension)", F_OK) == 0 {
            remember(uuid, f)
            return f
        }
        return format
    }

    func remember(_ uuid: String, _ f: any ImageFormat) {
        formatCache.withLock { $0[uuid] = f.name }
    }

    /// The image file of `uuid` were it of format `f`.
    func imagePath(_ uuid: String, format f: any ImageFormat) -> String { "\(path)/\(uuid).\(f.fileExtension)" }

    /// The format a new VDI is made in: `sm_config:image-format` when given (checked
    /// against this SR's formats and the size), else this SR's default if it holds the
    /// size, else the first of its formats with chains that does.
    func formatForNewVDI(smConfig: [String: String], size: UInt64) throws -> any ImageFormat {
        let names = supportedImageFormats.map(\.name).joined(separator: ", ")
        if let asked = smConfig["image-format"] {
            guard let f = Formats.named(asked.lowercased()) else {
                throw StorageError.valueNotSupported(field: "sm_config:image-format", value: asked,
                    reason: "unknown image format (known: \(Formats.all.map(\.name).joined(separator: ", "))); this SR holds \(names)")
            }
            guard supportedImageFormats.contains(where: { $0.name == f.name }) else {
                throw StorageError.valueNotSupported(field: "sm_config:image-format", value: asked,
                    reason: "this SR holds \(names)")
            }
            guard size <= f.maxVirtualSize else {
                throw StorageError.valueNotSupported(field: "virtual_size", value: String(size),
                    reason: "\(f.name) holds at most \(f.maxVirtualSize >> 30) GiB; of this SR's formats (\(names)), "
                        + (supportedImageFormats.filter { size <= $0.maxVirtualSize }.map { "sm_config:image-format=\($0.name)" }
                            .joined(separator: " or ").nonEmpty.map { "ask for \($0)" } ?? "none holds it"))
            }
            return f
        }
        if size <= format.maxVirtualSize { return format }
        // Past the default's limit: another format with chains (qcow2 for XCP-ng), never
        // silently one without (a raw VDI has no snapshots).
        if let f = supportedImageFormats.first(where: { $0.holdsChains && size <= $0.maxVirtualSize }) { return f }
        let others = supportedImageFormats.filter { size <= $0.maxVirtualSize }.map(\.name)
        throw StorageError.valueNotSupported(field: "virtual_size", value: String(size),
            reason: "\(format.name) holds at most \(format.maxVirtualSize >> 30) GiB"
                + (others.isEmpty ? " and no format of this SR (\(names)) holds more"
                                  : "; ask for \(others.map { "sm_config:image-format=\($0)" }.joined(separator: " or ")) (this SR holds \(names))"))
    }

    /// Refuses an operation that needs a chain (snapshot, clone, an overlay, CBT) on a
    /// VDI whose format has none.
    func requireChains(_ uuid: String, for operation: String) throws {
        let f = format(of: uuid)
        guard f.holdsChains else {
            throw StorageError.vdiIncompatibleType(uuid: uuid, type: "\(f.name) (an image without a chain has no \(operation))")
        }
    }

    /// Parses `supported_image_formats` as given on the command line or in the SR's
    /// configuration: names separated by `+` or `,`, the default first.
    public static func parseImageFormats(_ text: String) throws -> [any ImageFormat] {
        var out: [any ImageFormat] = []
        for n in text.split(whereSeparator: { $0 == "+" || $0 == "," }).map({ $0.trimmingCharacters(in: .whitespaces).lowercased() }) {
            guard let f = Formats.named(n) else {
                throw StorageError.valueNotSupported(field: "supported_image_formats", value: n,
                    reason: "known formats: \(Formats.all.map(\.name).joined(separator: ", "))")
            }
            if !out.contains(where: { $0.name == f.name }) { out.append(f) }
        }
        guard !out.isEmpty else {
            throw StorageError.valueNotSupported(field: "supported_image_formats", value: text,
                reason: "name at least one of \(Formats.all.map(\.name).joined(separator: ", "))")
        }
        return out
    }

    static let imageFormatsKey = "supported-image-formats"
    /// `sm_config` keys filled in from the files on every read, never stored.
    static let computedSMConfigKeys = Formats.all.map { "\($0.name)-parent" } + ["chain-depth"]
}

extension String {
    var nonEmpty: String? { isEmpty ? nil : self }
}

extension SR {
    /// The uuid of an image file's name (`<uuid>.<a format's extension>`), else nil.
    static func imageUUID(_ name: String) -> String? {
        for f in Formats.all where name.hasSuffix("." + f.fileExtension) {
            let u = String(name.dropLast(f.fileExtension.count + 1))
            if UUID(uuidString: u) != nil { return u }
        }
        return nil
    }
}
