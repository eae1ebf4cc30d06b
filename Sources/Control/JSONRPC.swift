import Foundation

/// Any JSON value, for JSON-RPC params and results.
public enum JSONValue: Codable, Equatable, Sendable {
    case null
    case bool(Bool)
    case number(Double)
    case string(String)
    case array([JSONValue])
    case object([String: JSONValue])
    /// A string the server built from bytes it knows are printable ASCII with no quote or
    /// backslash (base64): framed as they are, without a scan or a copy into a String.
    /// Decoding never produces it; a client sees a `.string`.
    case ascii([UInt8])

    public init(from decoder: Decoder) throws {
        let c = try decoder.singleValueContainer()
        if c.decodeNil() { self = .null }
        else if let b = try? c.decode(Bool.self) { self = .bool(b) }
        else if let n = try? c.decode(Double.self) { self = .number(n) }
        else if let s = try? c.decode(String.self) { self = .string(s) }
        else if let a = try? c.decode([JSONValue].self) { self = .array(a) }
        else { self = .object(try c.decode([String: JSONValue].self)) }
    }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.singleValueContainer()
        switch self {
        case .null: try c.encodeNil()
        case .bool(let b): try c.encode(b)
        case .number(let n):
            if n == n.rounded(), abs(n) < 9.007e15 { try c.encode(Int64(n)) } else { try c.encode(n) }
        case .string(let s): try c.encode(s)
        case .ascii(let b): try c.encode(String(decoding: b, as: UTF8.self))
        case .array(let a): try c.encode(a)
        case .object(let o): try c.encode(o)
        }
    }

    public var stringValue: String? {
        switch self {
        case .string(let s): return s
        case .ascii(let b): return String(decoding: b, as: UTF8.self)
        default: return nil
        }
    }
    public var objectValue: [String: JSONValue]? { if case .object(let o) = self { return o }; return nil }
    public var arrayValue: [JSONValue]? { if case .array(let a) = self { return a }; return nil }

    /// Converts any Encodable (records, lists) to a JSONValue.
    public static func from<T: Encodable>(_ v: T) throws -> JSONValue {
        let enc = JSONEncoder()
        enc.dateEncodingStrategy = .iso8601
        return try JSONDecoder().decode(JSONValue.self, from: enc.encode(v))
    }

    public func decode<T: Decodable>(as: T.Type) throws -> T {
        let dec = JSONDecoder()
        dec.dateDecodingStrategy = .iso8601
        return try dec.decode(T.self, from: JSONEncoder().encode(self))
    }
}

public struct RPCRequest: Codable, Sendable {
    public var jsonrpc: String
    public var method: String
    public var params: JSONValue?
    public var id: JSONValue?
    public init(method: String, params: [JSONValue], id: Int) {
        self.init(jsonrpc: "2.0", method: method, params: .array(params), id: .number(Double(id)))
    }

    public init(jsonrpc: String, method: String, params: JSONValue?, id: JSONValue?) {
        self.jsonrpc = jsonrpc
        self.method = method
        self.params = params
        self.id = id
    }
}

public struct RPCError: Codable, Error, Sendable, Equatable {
    public var code: Int
    public var message: String
    public var data: JSONValue?
    public init(code: Int, message: String, data: JSONValue? = nil) {
        self.code = code
        self.message = message
        self.data = data
    }

    /// JSON-RPC 2.0's own codes.
    public static func parseError(_ detail: String) -> RPCError { RPCError(code: -32700, message: "Parse error", data: .string(detail)) }
    public static func invalidRequest(_ detail: String) -> RPCError { RPCError(code: -32600, message: "Invalid Request", data: .string(detail)) }
    public static func methodNotFound(_ m: String) -> RPCError {
        RPCError(code: -32601, message: "Method not found", data: .array([.string("MESSAGE_METHOD_UNKNOWN"), .string(m)]))
    }
    public static func invalidParams(_ detail: String) -> RPCError { RPCError(code: -32602, message: "Invalid params", data: .string(detail)) }
    /// Application failures: one code; XenAPI's ErrorDescription in `data`.
    public static let applicationCode = 1
    public static func xenAPI(_ code: String, _ params: [String]) -> RPCError {
        RPCError(code: applicationCode, message: code, data: .array(([code] + params).map { .string($0) }))
    }

    /// The XenAPI error code and parameters, when this is an application failure.
    public var errorDescription: [String] {
        data?.arrayValue?.compactMap(\.stringValue) ?? [message]
    }
}

public struct RPCResponse: Codable, Sendable {
    public var jsonrpc = "2.0"
    public var result: JSONValue?
    public var error: RPCError?
    public var id: JSONValue?
    public init(result: JSONValue?, error: RPCError?, id: JSONValue?) {
        self.result = result
        self.error = error
        self.id = id
    }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(jsonrpc, forKey: .jsonrpc)
        if let e = error { try c.encode(e, forKey: .error) } else { try c.encode(result ?? .null, forKey: .result) }
        try c.encode(id ?? .null, forKey: .id)
    }
}

/// Parses sizes as admins write them: `1073741824`, `64MiB`, `2GiB`, `512B`, `10G`.
public func parseSize(_ s: String) -> UInt64? {
    let t = s.trimmingCharacters(in: .whitespaces)
    let units: [(String, UInt64)] = [("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10),
                                     ("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10), ("B", 1)]
    for (suffix, mult) in units where t.hasSuffix(suffix) {
        guard let n = UInt64(t.dropLast(suffix.count).trimmingCharacters(in: .whitespaces)) else { return nil }
        let (r, o) = n.multipliedReportingOverflow(by: mult)
        return o ? nil : r
    }
    return UInt64(t)
}
