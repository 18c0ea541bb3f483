import { once } from "node:events";
import net from "node:net";

/**
 * A TCP proxy a test controls, for cutting a server off from a backend
 * (PostgreSQL) without touching the shared backend itself.
 *
 * `cut()` destroys every proxied connection and refuses new ones (each is
 * accepted and reset at once, as a crashed or restarting database looks to a
 * client); `restore()` forwards again. `holdReplies()` lets requests through
 * but keeps the backend's answers until `releaseReplies()`: a command that
 * has run but whose reply is still on its way. `holdRepliesAfter(text)`
 * starts holding the moment a request containing `text` goes through, for a
 * reply that is late exactly where a test needs it. Listens on 127.0.0.1 on
 * a free port.
 */
export class TcpProxy {
  private readonly sockets = new Set<net.Socket>();
  /** Each live connection's backend side, and the client side its replies go to. */
  private readonly replies = new Map<net.Socket, net.Socket>();
  private isCut = false;
  private holding = false;
  private holdAfter: string | undefined;
  /** Connections refused while cut, for assertions and reports. */
  refused = 0;

  private constructor(
    private readonly server: net.Server,
    readonly port: number,
  ) {}

  /** Starts forwarding 127.0.0.1:<port> to `target`. */
  static async start(target: { host: string; port: number }): Promise<TcpProxy> {
    let proxy: TcpProxy | undefined;
    const server = net.createServer((client) => proxy!.accept(client, target));
    server.listen(0, "127.0.0.1");
    await once(server, "listening");
    proxy = new TcpProxy(server, (server.address() as net.AddressInfo).port);
    return proxy;
  }

  get cutOff(): boolean {
    return this.isCut;
  }

  /** Live proxied connections (client side). */
  get connections(): number {
    return [...this.sockets].filter((s) => !s.destroyed).length / 2;
  }

  private accept(client: net.Socket, target: { host: string; port: number }): void {
    if (this.isCut) {
      this.refused++;
      client.resetAndDestroy();
      return;
    }
    const upstream = net.connect(target);
    this.sockets.add(client);
    this.sockets.add(upstream);
    const drop = () => {
      client.destroy();
      upstream.destroy();
      this.sockets.delete(client);
      this.sockets.delete(upstream);
      this.replies.delete(upstream);
    };
    client.on("error", drop).on("close", drop);
    upstream.on("error", drop).on("close", drop);
    this.replies.set(upstream, client);
    client.pipe(upstream);
    // After the pipe's own listener: the request is on its way before its reply is held.
    client.on("data", (chunk: Buffer) => {
      if (this.holdAfter !== undefined && chunk.toString("latin1").includes(this.holdAfter)) {
        this.holdAfter = undefined;
        this.holdReplies();
      }
    });
    if (!this.holding) upstream.pipe(client);
  }

  /** From now on, replies wait in the proxy (requests still go through). */
  holdReplies(): void {
    if (this.holding) return;
    this.holding = true;
    for (const [upstream, client] of this.replies) {
      upstream.unpipe(client);
      upstream.pause();
    }
  }

  /** Holds replies from when a request containing `text` next goes through (its own reply included). */
  holdRepliesAfter(text: string): void {
    this.holdAfter = text;
  }

  /** Whether replies are being held. */
  get holdingReplies(): boolean {
    return this.holding;
  }

  /** Delivers the held replies and forwards again; safe to call twice (a second pipe would send every reply twice). */
  releaseReplies(): void {
    if (!this.holding) return;
    this.holding = false;
    for (const [upstream, client] of this.replies) upstream.pipe(client);
  }

  /** Destroys every proxied connection and refuses new ones until {@link restore}. */
  cut(): void {
    this.isCut = true;
    for (const s of this.sockets) {
      // A reset, not a FIN: what a client sees when the database process dies.
      if (!s.destroyed) s.resetAndDestroy();
    }
    this.sockets.clear();
  }

  /** Accepts and forwards new connections again. */
  restore(): void {
    this.isCut = false;
  }

  /** Stops listening and drops everything; safe to call twice. */
  async close(): Promise<void> {
    this.cut();
    if (!this.server.listening) return;
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}
