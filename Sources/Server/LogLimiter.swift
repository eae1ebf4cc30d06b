// Lines that a client can make the server write at will (a connection closed during the
// handshake, an option refused, a connection over the limit) are let through at most
// `perSecond` a second; the next line let through says how many were held back. A flood
// of hostile connections then costs a few lines a second, not one per connection.

import Foundation
import Locking

final class LogLimiter: Sendable {
    let perSecond: Int
    private struct Window { var start: UInt64 = 0; var used = 0; var held = 0 }
    private let window = Mutex(Window())

    init(perSecond: Int = 10) { self.perSecond = perSecond }

    /// Nil: hold this line back. Otherwise the line goes out, with the suffix to add
    /// (empty, or how many lines were held back since the last one let through).
    func admit(now: UInt64 = DispatchTime.now().uptimeNanoseconds) -> String? {
        window.withLock { w in
            if now &- w.start >= 1_000_000_000 {
                w.start = now
                w.used = 0
            }
            guard w.used < perSecond else {
                w.held += 1
                return nil
            }
            w.used += 1
            defer { w.held = 0 }
            return w.held == 0 ? "" : " (\(w.held) similar lines held back)"
        }
    }
}
