// Which backups a keep policy keeps, in restic's manner (forget --keep-last/daily/weekly/monthly),
// applied per volume: newest first, each rule keeps the newest backup of each of its last N
// periods (UTC days, ISO weeks, months).
import type { ManifestHeader } from './manifest.js';

export interface KeepPolicy {
  last?: number;
  daily?: number;
  weekly?: number;
  monthly?: number;
}

export function hasKeepOption(p: KeepPolicy): boolean {
  return p.last !== undefined || p.daily !== undefined || p.weekly !== undefined || p.monthly !== undefined;
}

const dayKey = (d: Date) => d.toISOString().slice(0, 10);
const monthKey = (d: Date) => d.toISOString().slice(0, 7);

/** ISO 8601 week, as "YYYY-Www": weeks start on Monday, week 1 holds the year's first Thursday. */
export function weekKey(d: Date): string {
  const t = new Date(Date.UTC(d.getUTCFullYear(), d.getUTCMonth(), d.getUTCDate()));
  const dow = t.getUTCDay() || 7;
  t.setUTCDate(t.getUTCDate() + 4 - dow);
  const yearStart = Date.UTC(t.getUTCFullYear(), 0, 1);
  const week = Math.ceil(((t.getTime() - yearStart) / 86400000 + 1) / 7);
  return `${t.getUTCFullYear()}-W${String(week).padStart(2, '0')}`;
}

/** The ids `policy` keeps among the backups of one volume. With no keep option, all are kept; with any, at least the newest. */
export function keptByPolicy(backups: readonly ManifestHeader[], policy: KeepPolicy): Set<string> {
  const newest = [...backups].sort((a, b) => Date.parse(b.time) - Date.parse(a.time) || b.id.localeCompare(a.id));
  if (!hasKeepOption(policy)) return new Set(newest.map((b) => b.id));
  const kept = new Set<string>();
  for (const b of newest.slice(0, Math.max(0, policy.last ?? 0))) kept.add(b.id);
  const rules: Array<[number | undefined, (d: Date) => string]> = [
    [policy.daily, dayKey],
    [policy.weekly, weekKey],
    [policy.monthly, monthKey],
  ];
  for (const [n, key] of rules) {
    let left = n ?? 0;
    let lastBucket: string | undefined;
    for (const b of newest) {
      if (left <= 0) break;
      const k = key(new Date(b.time));
      if (k === lastBucket) continue;
      lastBucket = k;
      kept.add(b.id);
      left--;
    }
  }
  if (kept.size === 0 && newest.length > 0) kept.add(newest[0]!.id);
  return kept;
}
