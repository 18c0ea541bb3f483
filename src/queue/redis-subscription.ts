import type { Redis } from "ioredis";

/**
 * Keeps `sub` subscribed to `channel` across reconnects, subscribing on every
 * connect itself. ioredis's own re-subscribe (`autoResubscribe`, turned off
 * here) leaves the reply of its SUBSCRIBE unhandled, so a close before that
 * reply is an unhandled rejection, which ends a Node process
 * (redis/ioredis#2187, not in a release yet). `subscribed` is told once each
 * subscription is made, and whether it follows a reconnect: what was
 * published while there was none is lost. Nothing is done once `closing()`.
 */
export function subscribeOnEveryConnect(
  sub: Redis,
  channel: string,
  o: { closing: () => boolean; subscribed: (reconnect: boolean) => void; failed: (e: unknown) => void },
): void {
  sub.options.autoResubscribe = false;
  let connects = 0;
  sub.on("ready", () => {
    if (o.closing()) return;
    const reconnect = ++connects > 1;
    sub.subscribe(channel).then(
      () => {
        if (!o.closing()) o.subscribed(reconnect);
      },
      (e: unknown) => {
        if (!o.closing()) o.failed(e);
      },
    );
  });
}
