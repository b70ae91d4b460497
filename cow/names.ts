// What a volume or snapshot name may be, for every layer: names become file names in
// the data directory, so no separators, no dot-files and no '..' anywhere.

const NAME = /^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$/;

/** The rule in words, for messages that refuse a name. */
export const NAME_RULE = "1-64 letters, digits, '.', '_', '+' or '-', starting with a letter or digit, without '..'";

export function isValidName(name: string): boolean {
  return NAME.test(name) && !name.includes('..');
}
