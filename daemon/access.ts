// Per-export access rules from the config file's `exports` section:
//
//   exports:
//     vol0:
//       allow: [127.0.0.1, 10.0.0.0/8, "::1", "fd00::/8"]   # client addresses (CIDR)
//       readOnly: true                                      # NBD clients may not write
//       allowUnix: true                                     # unix-socket clients (default true)
//     "*":                                                  # every export not listed
//       allow: [127.0.0.1]
//
// An export with no rule (and no "*") is open to every client that can connect.
// A rule without `allow` restricts nothing but what its other keys say.
import { BlockList, isIP } from 'node:net';
import type { ClientInfo } from '../protocol/tls.js';
import { Errors } from './errors.js';
import { isValidName } from './names.js';

export interface ExportRule {
  /** CIDRs or addresses; undefined: any address. */
  allow?: string[];
  allowUnix: boolean;
  readOnly: boolean;
}

const DEFAULT_KEY = '*';
const RULE_KEYS = new Set(['allow', 'readOnly', 'read-only', 'allowUnix', 'allow-unix']);

/** "::ffff:10.1.2.3" (an IPv4 client on a dual-stack listener) is matched as 10.1.2.3. */
function normalize(address: string): { address: string; type: 'ipv4' | 'ipv6' } | undefined {
  const m = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(address);
  const a = m ? m[1]! : address;
  const v = isIP(a);
  if (v === 4) return { address: a, type: 'ipv4' };
  if (v === 6) return { address: a, type: 'ipv6' };
  return undefined;
}

/** Adds one allow entry ("10.0.0.0/8", "::1", "127.0.0.1") to the list; throws on a bad one. */
function addEntry(list: BlockList, entry: string, where: string): void {
  const [addr, prefix, ...rest] = entry.trim().split('/');
  const n = addr === undefined ? undefined : normalize(addr);
  if (!n || rest.length)
    throw Errors.badExports(`${where}: "${entry}" is not an IPv4 or IPv6 address or CIDR (host names are not accepted)`);
  const max = n.type === 'ipv4' ? 32 : 128;
  if (prefix === undefined) {
    list.addAddress(n.address, n.type);
    return;
  }
  if (!/^\d{1,3}$/.test(prefix) || Number(prefix) > max) throw Errors.badExports(`${where}: "${entry}" has a bad prefix length (0-${max})`);
  list.addSubnet(n.address, Number(prefix), n.type);
}

function bool(v: unknown, where: string): boolean | undefined {
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'boolean') throw Errors.badExports(`${where} must be true or false`);
  return v;
}

interface CompiledRule extends ExportRule {
  blocks?: BlockList;
}

export class ExportAccess {
  private constructor(private readonly rules: Map<string, CompiledRule>) {}

  static readonly open = new ExportAccess(new Map());

  /** Validates the `exports` section (an object, or its JSON text as yargs passes it). */
  static parse(value: unknown): ExportAccess {
    if (value === undefined || value === null || value === '') return ExportAccess.open;
    let v = value;
    if (typeof v === 'string') {
      try {
        v = JSON.parse(v);
      } catch {
        throw Errors.badExports('must be a mapping of export names to rules');
      }
    }
    if (typeof v !== 'object' || v === null || Array.isArray(v)) throw Errors.badExports('must be a mapping of export names to rules');
    const rules = new Map<string, CompiledRule>();
    for (const [name, raw] of Object.entries(v as Record<string, unknown>)) {
      if (name !== DEFAULT_KEY && !isValidName(name)) throw Errors.badExports(`"${name}" is not a valid export name (or "*")`);
      const where = `exports.${name}`;
      if (raw === null) {
        rules.set(name, { allowUnix: true, readOnly: false });
        continue;
      }
      if (typeof raw !== 'object' || Array.isArray(raw)) throw Errors.badExports(`${where} must be a mapping (allow, readOnly, allowUnix)`);
      const r = raw as Record<string, unknown>;
      for (const k of Object.keys(r))
        if (!RULE_KEYS.has(k)) throw Errors.badExports(`${where}: unknown key "${k}" (expected allow, readOnly, allowUnix)`);
      const rule: CompiledRule = {
        allowUnix: bool(r.allowUnix ?? r['allow-unix'], `${where}.allowUnix`) ?? true,
        readOnly: bool(r.readOnly ?? r['read-only'], `${where}.readOnly`) ?? false,
      };
      const allow = r.allow;
      if (allow !== undefined && allow !== null) {
        const entries = typeof allow === 'string' ? [allow] : allow;
        if (!Array.isArray(entries) || entries.some((e) => typeof e !== 'string'))
          throw Errors.badExports(`${where}.allow must be a list of addresses or CIDRs`);
        rule.allow = entries as string[];
        rule.blocks = new BlockList();
        for (const e of rule.allow) addEntry(rule.blocks, e, `${where}.allow`);
      }
      rules.set(name, rule);
    }
    return new ExportAccess(rules);
  }

  get empty(): boolean {
    return this.rules.size === 0;
  }

  /** The rule governing an export: its own, else "*", else none. */
  rule(name: string): ExportRule | undefined {
    return this.rules.get(name) ?? this.rules.get(DEFAULT_KEY);
  }

  readOnly(name: string): boolean {
    return this.rule(name)?.readOnly ?? false;
  }

  authorize(name: string, client: ClientInfo): boolean {
    const rule = this.rules.get(name) ?? this.rules.get(DEFAULT_KEY);
    if (!rule) return true;
    if (client.unix) return rule.allowUnix;
    if (!rule.blocks) return true;
    const n = client.address === undefined ? undefined : normalize(client.address);
    return n !== undefined && rule.blocks.check(n.address, n.type);
  }

  /** For the startup log. */
  describe(): Record<string, ExportRule> {
    return Object.fromEntries([...this.rules].map(([k, r]) => [k, { allow: r.allow, allowUnix: r.allowUnix, readOnly: r.readOnly }]));
  }
}
